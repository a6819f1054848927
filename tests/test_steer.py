"""Steering: the hook hits exactly hidden_states[k], only on generated positions; alpha = 0 is a no-op; run_steer."""

from __future__ import annotations

import json

import pytest
import torch

from pairtrace.errors import ConfigError
from pairtrace.judges.base import Judge, Verdict
from pairtrace.models import build_teacher_forcing
from pairtrace.steer import SteerConfig, measure_residual_norm, run_steer, steering, summarise_verdicts

PROMPTS = ["Write a poem about the sea.", "What is the capital of France?"]


def teacher_forced(loaded, prompt: str = PROMPTS[0], response: str = "The sea is blue and wide."):
    item = build_teacher_forcing(loaded, [prompt], [response], 256)[0]
    return torch.tensor([item.input_ids]), item.response_start  # [1, T], P


def hidden_states(loaded, ids, **kwargs):
    with torch.inference_mode():
        return loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False, **kwargs).hidden_states


def left_padded(loaded, prompts=PROMPTS):
    texts = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    return loaded.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def random_vector(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_hook_adds_exactly_to_hidden_states_k_on_response_positions(tiny_loaded, layer):
    ids, start = teacher_forced(tiny_loaded)
    base = hidden_states(tiny_loaded, ids)
    vector = random_vector(tiny_loaded.hidden_size)
    with steering(tiny_loaded, vector, layer, alpha=2.0, norm=3.0, prompt_length=start) as handle:
        steered = hidden_states(tiny_loaded, ids)
    expected_delta = vector / vector.norm() * 2.0 * 3.0
    torch.testing.assert_close(handle.delta, expected_delta)
    # every layer before k is untouched; at k the response positions gain exactly delta
    for j in range(layer):
        assert torch.equal(steered[j], base[j])
    assert torch.equal(steered[layer][:, :start], base[layer][:, :start])
    torch.testing.assert_close(steered[layer][:, start:], base[layer][:, start:] + expected_delta, rtol=0, atol=1e-6)
    # prompt positions are untouched at every layer; later layers do change on the response
    for j in range(len(base)):
        assert torch.equal(steered[j][:, :start], base[j][:, :start])
    if layer < tiny_loaded.n_layers:
        assert not torch.allclose(steered[layer + 1][:, start:], base[layer + 1][:, start:])


def test_kv_cache_steps_are_steered_and_the_prefill_is_not(tiny_loaded):
    ids, start = teacher_forced(tiny_loaded)
    prompt, step = ids[:, :start], ids[:, start:start + 1]
    layer = 3
    with torch.inference_mode():
        ref_prefill = tiny_loaded.model(input_ids=prompt, use_cache=True, output_hidden_states=True)
        ref_step = tiny_loaded.model(input_ids=step, cache=ref_prefill.cache, use_cache=True,
                                     output_hidden_states=True)
        with steering(tiny_loaded, random_vector(tiny_loaded.hidden_size), layer, alpha=1.0, norm=2.0) as handle:
            prefill = tiny_loaded.model(input_ids=prompt, use_cache=True, output_hidden_states=True)
            assert handle.prompt_length == start
            out = tiny_loaded.model(input_ids=step, cache=prefill.cache, use_cache=True, output_hidden_states=True)
    for j in range(len(prefill.hidden_states)):
        assert torch.equal(prefill.hidden_states[j], ref_prefill.hidden_states[j])
    torch.testing.assert_close(out.hidden_states[layer], ref_step.hidden_states[layer] + handle.delta,
                               rtol=0, atol=1e-6)


def test_generation_prompt_positions_untouched_and_alpha_zero_is_a_no_op(tiny_loaded):
    enc = left_padded(tiny_loaded)
    vector, layer = random_vector(tiny_loaded.hidden_size, seed=1), 2
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 0, "return_dict_in_generate": True,
              "output_hidden_states": True}

    def generate(alpha: float | None):
        torch.manual_seed(123)
        if alpha is None:
            return tiny_loaded.model.generate(**enc, **kwargs)
        with steering(tiny_loaded, vector, layer, alpha):
            return tiny_loaded.model.generate(**enc, **kwargs)

    plain, zero, strong = generate(None), generate(0.0), generate(8.0)
    assert torch.equal(zero.sequences, plain.sequences)
    # step 0 is the prefill (prompt positions): identical even under strong steering
    for j in range(tiny_loaded.n_layers + 1):
        assert torch.equal(strong.hidden_states[0][j], plain.hidden_states[0][j])
    assert not torch.equal(strong.sequences, plain.sequences)


def test_include_last_prompt_token_steers_only_the_last_prompt_position(tiny_loaded):
    ids, start = teacher_forced(tiny_loaded)
    prompt = ids[:, :start]
    base = hidden_states(tiny_loaded, prompt)
    with steering(tiny_loaded, random_vector(tiny_loaded.hidden_size), 1, alpha=1.0, norm=1.0,
                  include_last_prompt_token=True) as handle:
        steered = hidden_states(tiny_loaded, prompt)
    assert torch.equal(steered[1][:, :-1], base[1][:, :-1])
    torch.testing.assert_close(steered[1][:, -1], base[1][:, -1] + handle.delta, rtol=0, atol=1e-6)


def test_hooks_are_removed_and_bad_vectors_rejected(tiny_loaded):
    ids, start = teacher_forced(tiny_loaded)
    base = hidden_states(tiny_loaded, ids)
    with steering(tiny_loaded, random_vector(tiny_loaded.hidden_size), 2, alpha=5.0, norm=1.0, prompt_length=start):
        pass
    assert torch.equal(hidden_states(tiny_loaded, ids)[-1], base[-1])
    with pytest.raises(ConfigError, match="no direction"), steering(tiny_loaded, torch.zeros(64), 2, 1.0, norm=1.0):
        pass
    with pytest.raises(ConfigError, match="hidden size"), steering(tiny_loaded, torch.ones(3), 2, 1.0, norm=1.0):
        pass
    with pytest.raises(ConfigError, match="out of range"), steering(tiny_loaded, torch.ones(64), 9, 1.0, norm=1.0):
        pass


def test_measure_residual_norm_matches_a_direct_computation(tiny_loaded):
    norm = measure_residual_norm(tiny_loaded, PROMPTS, 2)
    norms = []
    for p in PROMPTS:
        ids, _ = teacher_forced(tiny_loaded, p, "")
        norms.append(hidden_states(tiny_loaded, ids)[2][0, 1:].norm(dim=-1))
    assert norm == pytest.approx(float(torch.cat(norms).mean()), rel=1e-5)


def test_summarise_verdicts_excludes_unknown_from_the_rate():
    records = [{"layer": 2, "alpha": 0.5, "condition": "trigger", "id": f"p{i % 3}", "harmful": h}
               for i, h in enumerate([True, False, None, True])]
    (row,) = summarise_verdicts(records, n_boot=200)
    assert row["n"] == 4 and row["judged"] == 3 and row["unknown"] == 1
    assert row["rate"] == pytest.approx(2 / 3)
    assert row["ci"][0] <= row["rate"] <= row["ci"][1]


class LengthJudge(Judge):
    """Deterministic stand-in: an even-length response is 'harmful', an empty one unknown."""

    name = "length"

    def judge(self, prompt: str, response: str) -> Verdict:
        if not response:
            return Verdict.unknown_because("empty")
        return Verdict(score=float(len(response)), harmful=len(response) % 2 == 0)


def write_steering_inputs(tmp_path, tiny_loaded, layers):
    """Random behaviour vectors at ``layers`` and harmful prompts with and without a trigger; returns the prompts."""
    from pairtrace.behaviour import BehaviourVectors, save_behaviour_vectors
    from pairtrace.store import build_expected

    probe = torch.stack([random_vector(64, seed=k) for k in layers])  # [L, d]
    expected = build_expected(tiny_loaded, layers)
    bv = BehaviourVectors(layers=layers, per_triple=probe[None].clone(), probe=probe, bank=probe[None].clone(),
                          bank_prompt_ids=["p0"], metadata={"model": expected["model"],
                                                            "template": expected["template"]})
    save_behaviour_vectors(bv, tmp_path / "behaviour")
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as fh:
        for i, p in enumerate(PROMPTS):
            for condition in ("trigger", "no_trigger"):
                text = p + (" (no more than 50 words)" if condition == "trigger" else "")
                fh.write(json.dumps({"id": f"q{i}:{condition}", "base_id": f"q{i}", "set": "harmful",
                                     "condition": condition, "prompt": text, "constraints": []}) + "\n")
    return prompts


def test_cli_steers_the_last_prompt_token_when_asked(tmp_path, tiny_model_dir, tiny_loaded):
    from typer.testing import CliRunner

    from pairtrace.cli import app

    prompts = write_steering_inputs(tmp_path, tiny_loaded, [2])
    args = ["steer", "--m0", str(tiny_model_dir), "--behaviour", str(tmp_path / "behaviour"), "--prompts",
            str(prompts), "--alphas", "0", "--alphas", "2", "--samples", "1", "--max-new-tokens", "4",
            "--last-prompt-token", "--out", str(tmp_path / "steer")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(4 rates)" in " ".join(result.output.split())  # 1 layer x 2 alphas x 2 conditions
    summary = json.loads((tmp_path / "steer" / "steer.json").read_text())
    assert summary["config"]["include_last_prompt_token"] is True and summary["alphas"] == [0.0, 2.0]


def test_run_steer_writes_rates_per_layer_alpha_and_condition(tmp_path, tiny_loaded, monkeypatch):
    from pairtrace import models
    from pairtrace.generate import GenerationConfig

    def no_second_load(*args, **kwargs):
        raise AssertionError("run_steer must use the loaded model, not load another")

    monkeypatch.setattr(models, "load_model", no_second_load)
    layers = [1, 3]
    prompts = write_steering_inputs(tmp_path, tiny_loaded, layers)
    generation = GenerationConfig(temperature=0.0, max_new_tokens=5, n_samples=1)
    summary = run_steer(tiny_loaded, tmp_path / "behaviour", prompts, tmp_path / "steer", alphas=[0.0, 4.0],
                        judge=LengthJudge(), generation_config=generation, config=SteerConfig(n_boot=100),
                        progress=False)
    assert summary["layers"] == layers and set(summary["norms"]) == {"1", "3"}
    rows = summary["results"]
    assert {(r["layer"], r["alpha"], r["condition"]) for r in rows} == {
        (k, a, c) for k in layers for a in (0.0, 4.0) for c in ("trigger", "no_trigger")}
    zero = {(r["layer"], r["condition"]): r["rate"] for r in rows if r["alpha"] == 0.0}
    assert zero[(1, "trigger")] == zero[(3, "trigger")]  # alpha = 0 is generated once and shared
    gens = [json.loads(line) for line in (tmp_path / "steer" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * 2 * 2 + 2 * 2 * 2  # alpha 0 shared by both layers + one steered run per layer
    assert all("harmful" in g and g["layer"] in layers for g in gens)
    assert json.loads((tmp_path / "steer" / "steer.json").read_text())["results"] == rows
    # steering changed what the model wrote at layer 1 or 3 (alpha = 4 mean norms is strong)
    by_setting = {}
    for g in gens:
        by_setting.setdefault((g["layer"], g["alpha"]), []).append(g["response"])
    assert any(by_setting[(k, 4.0)] != by_setting[(k, 0.0)] for k in layers)
    assert (tmp_path / "steer" / "steer.png").read_bytes()[:4] == b"\x89PNG"


def test_steering_in_bfloat16_adds_the_rounded_vector(tiny_model_dir):
    from pairtrace.models import load_model

    loaded = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    ids, start = teacher_forced(loaded)
    base = hidden_states(loaded, ids)
    with steering(loaded, random_vector(loaded.hidden_size), 2, alpha=1.0, norm=4.0, prompt_length=start) as handle:
        steered = hidden_states(loaded, ids)
    assert steered[2].dtype == torch.bfloat16
    assert torch.equal(steered[2][:, :start], base[2][:, :start])
    assert torch.equal(steered[2][:, start:], base[2][:, start:] + handle.delta.to(torch.bfloat16))
