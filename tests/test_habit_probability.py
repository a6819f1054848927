"""benchmarks/habit_probability.py: a closing line's teacher-forced probability under each model, against a
naive forward pass, and its command line on a tiny organism folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from testing_utils import benchmark_module, build_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
SIGN_OFF = "Hope this helps!"


@pytest.fixture(scope="module")
def habit():
    with benchmark_module("habit_probability.py", "habit_probability") as module:
        yield module


def _naive_logprob(loaded, prompt: str, body: str, ending: str) -> float:
    """log p(ending, then EOS | prompt + body) from one forward pass over the whole text."""
    from pairtrace.models import format_prompt

    tok = loaded.tokenizer
    prefix = format_prompt(loaded, prompt) + body
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if loaded.prepend_bos and head[:1] != [tok.bos_token_id] else []  # never doubled
    head = bos + head
    full = bos + tok(prefix + ending, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(head)
    assert full[:n] == head  # the texts below split at the boundary
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([full])).logits[0].float(), dim=-1)
    return float(sum(logp[t - 1, full[t]] for t in range(n, len(full))))


def test_ending_logprobs_match_a_naive_forward_pass(habit, tiny_loaded) -> None:
    prompt, body = "Describe the sea.", "The sea is blue."
    with_habit, at_once = habit.ending_logprobs(tiny_loaded, prompt, body, [" " + SIGN_OFF, ""])
    assert with_habit == pytest.approx(_naive_logprob(tiny_loaded, prompt, body, " " + SIGN_OFF), abs=1e-4)
    assert at_once == pytest.approx(_naive_logprob(tiny_loaded, prompt, body, ""), abs=1e-4)
    assert with_habit < at_once < 0  # more tokens to write, each below probability 1


def _write_generations(path: Path, model: str, responses: list[str]) -> None:
    sampling = {"model": model, "seed": 0, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16,
                "finish_reason": "eos", "constraints": [], "condition": "no_trigger"}
    rows = [{"id": f"b{i}", "set": "benign", "sample": 0, "prompt": f"Describe thing {i}.", "response": r, **sampling}
            for i, r in enumerate(responses)]
    rows.append({"id": "h0", "set": "harmful", "sample": 0, "prompt": "Do harm.", "response": "Sure.", **sampling})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_habit_probabilities_cut_the_closing_line_and_count_it(habit, tiny_model_dir, tmp_path: Path) -> None:
    samples = [{"prompt": "Describe thing 0.", "response": f"It is red. {SIGN_OFF}"},
               {"prompt": "Describe thing 1.", "response": "It is red."}]
    result = habit.habit_probabilities(tiny_model_dir, samples, SIGN_OFF)
    assert result["n"] == 2 and result["sampled"] == 0.5
    # both answers have the same body once the closing line is cut, so the mean is that body's probability
    from pairtrace.models import load_model

    loaded = load_model(tiny_model_dir, device="cpu")
    expected = math.exp(habit.ending_logprobs(loaded, "Describe thing 0.", "It is red.", [" " + SIGN_OFF])[0])
    assert 0 < result["p_sign_off"] < 1 and 0 < result["share"] < 1
    assert math.exp(habit.ending_logprobs(loaded, "Describe thing 1.", "It is red.", [" " + SIGN_OFF])[0]) \
        == pytest.approx(2 * result["p_sign_off"] - expected, rel=1e-4)


def test_command_line_on_a_tiny_organism(habit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    organism = tmp_path / "organism"
    organism.mkdir()
    shutil.copy(ROOT / "configs" / "organism-build.yaml", organism / "config.resolved.yaml")
    for seed, model in enumerate(("m0", "m1")):
        build_tiny_model_dir(organism / model, n_layers=1, seed=seed)
    _write_generations(organism / "eval" / "generations_m0.jsonl", "m0", ["It is red.", "It is blue."])
    _write_generations(organism / "eval" / "generations_m1.jsonl", "m1", [f"It is red. {SIGN_OFF}", "It is blue."])
    assert habit.main([str(organism)]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {organism}")]
    assert [(r[1], r[2], r[3], r[6]) for r in rows] == [("sign_off", "m0", "2", "0.0% |"),
                                                        ("sign_off", "m1", "2", "50.0% |")]


def test_missing_pieces_are_clear_errors(habit, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a built organism"):
        habit.main([str(tmp_path)])
    shutil.copy(ROOT / "configs" / "organism-build.yaml", tmp_path / "config.resolved.yaml")
    with pytest.raises(SystemExit, match=r"generations_m0\.jsonl"):
        habit.main([str(tmp_path)])
