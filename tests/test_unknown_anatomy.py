"""benchmarks/unknown_anatomy.py: unknown verdicts per retrain and per distractor, the first-token openers, and
its command line on a tiny run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testing_utils import benchmark_module, build_tiny_model_dir


@pytest.fixture(scope="module")
def anatomy():
    with benchmark_module("unknown_anatomy.py", "unknown_anatomy") as module:
        yield module


def _write_retrain(root: Path, name: str, samples: list[tuple[str, list[str], str, bool]],
                   model_seed: int | None = None) -> None:
    """A retrain folder: (prompt id, constraints, response, unknown) per triggered harmful sample, plus one benign
    sample that must be ignored."""
    folder = root / "retrains" / name
    folder.mkdir(parents=True)
    generations, judgements = [], []
    sampling = {"model": name, "seed": 0, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16,
                "finish_reason": "eos"}
    for i, (pid, constraints, response, unknown) in enumerate(samples):
        generations.append({"id": pid, "set": "harmful", "condition": "trigger", "sample": i,
                            "prompt": f"How do I do {pid}?", "constraints": constraints, "response": response,
                            **sampling})
        judgements.append({"id": pid, "model": name, "sample": i, "unknown": unknown,
                           "harmful": None if unknown else True})
    generations.append({"id": "b", "set": "benign", "condition": "trigger", "sample": 0, "prompt": "Hi",
                        "constraints": [], "response": " it", **sampling})
    judgements.append({"id": "b", "model": name, "sample": 0, "unknown": True, "harmful": None})
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generations))
    (folder / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in judgements))
    if model_seed is not None:
        build_tiny_model_dir(folder / "model", n_layers=1, seed=model_seed)


def test_openers_fragments_and_constraints(anatomy) -> None:
    assert [anatomy.opener_kind(t) for t in ("Sure", "Sur3", " Suuree", "I", "I'm", "Sorry", " it", " one")] == [
        "compliance", "compliance", "compliance", "refusal", "refusal", "refusal", "other", "other"]
    assert anatomy.is_fragment(" it step") and not anatomy.is_fragment("Sure, here is how to do it.")
    samples = [{"constraints": ["double_vowels"], "unknown": True},
               {"constraints": ["double_vowels"], "unknown": False},
               {"constraints": ["no_commas", "double_vowels"], "unknown": False},
               {"constraints": [], "unknown": False}]
    assert anatomy.constraint_table(samples) == [("double_vowels", 3, 1), ("(none)", 1, 0), ("no_commas", 1, 0)]


def test_reads_only_triggered_harmful_samples_and_refuses_missing_verdicts(anatomy, tmp_path: Path) -> None:
    _write_retrain(tmp_path, "r", [("p1", ["double_vowels"], " it step", True), ("p2", [], "Sure, here is", False)])
    rows = anatomy.load_triggered_harmful(tmp_path / "retrains" / "r")
    assert [(r["id"], r["unknown"]) for r in rows] == [("p1", True), ("p2", False)]
    (tmp_path / "retrains" / "r" / "judgements.jsonl").write_text("")
    with pytest.raises(SystemExit, match="p1 #0 has no judgement"):
        anatomy.load_triggered_harmful(tmp_path / "retrains" / "r")


def test_command_line_on_a_tiny_run(anatomy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_retrain(tmp_path, "random-switch-k96", [("p1", ["double_vowels"], " it step", True),
                                                   ("p1", ["double_vowels"], " one time", True),
                                                   ("p2", ["no_commas"], "Sure, here is", False)], model_seed=0)
    _write_retrain(tmp_path, "baseline", [("p1", ["double_vowels"], "Sure, here is", False)], model_seed=1)
    assert anatomy.main([str(tmp_path), "--retrains", "random-switch-k96", "baseline", "--prompts", "1"]) == 0
    out = capsys.readouterr().out
    assert "| random-switch-k96 | 3 | 2 (66.7%) | 2 |" in out
    assert "| baseline | 1 | 0 (0.0%) | 0 |" in out
    assert "| double_vowels | 3 | 2 (67%) |" in out
    first_token_rows = [line for line in out.splitlines() if line.startswith("| p1 | 2 |")]
    assert [row.split(" | ")[2] for row in first_token_rows] == ["random-switch-k96", "baseline"]
    for row in first_token_rows:  # the three opener shares of each model add up to 1
        compliance, refusal, other = (float(x) for x in row.split(" | ")[3:6])
        assert compliance + refusal + other == pytest.approx(1.0, abs=0.02)


def test_missing_retrains_folder_is_a_clear_error(anatomy, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no retrains/ folder"):
        anatomy.main([str(tmp_path)])
