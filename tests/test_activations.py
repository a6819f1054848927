"""Tests for pairtrace.activations: batched early-stopping extraction against the naive reference."""

from __future__ import annotations

import pytest
import torch

from pairtrace.activations import (
    _plan_batches,
    compute_means_from_teacher_forced,
    compute_response_means,
    compute_response_means_reference,
    nonfinite_rows,
)
from pairtrace.models import TeacherForced, build_teacher_forcing, get_decoder_layers, load_model


def _inputs(pairs):
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return prompts, responses


def _max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


@pytest.mark.parametrize("max_length", [24, 2048])
def test_batched_matches_reference(tiny_loaded, tiny_pairs, max_length):
    prompts, responses = _inputs(tiny_pairs)
    items = build_teacher_forcing(tiny_loaded, prompts, responses, max_length)
    lengths = [len(it.input_ids) for it in items]
    batch_tokens = 96
    batches = _plan_batches(lengths, batch_tokens)
    # the setting really exercises padding: several batches, some with rows of different lengths
    assert len(batches) > 1
    assert any(len({lengths[i] for i in b}) > 1 for b in batches)
    assert any(it.truncated for it in items) == (max_length == 24)
    layers = [0, 1, 3, 4]
    batched = compute_response_means(
        tiny_loaded, prompts, responses, layers, batch_tokens=batch_tokens, max_length=max_length, progress=False
    )
    reference = compute_response_means_reference(tiny_loaded, prompts, responses, layers, max_length=max_length)
    assert batched.shape == (len(prompts), len(layers), tiny_loaded.hidden_size)
    assert batched.dtype == torch.float32
    assert _max_relative_error(batched, reference) < 1e-5


def test_output_follows_input_order(tiny_loaded, tiny_pairs):
    prompts, responses = _inputs(tiny_pairs)
    forward = compute_response_means(tiny_loaded, prompts, responses, 2, batch_tokens=64, progress=False)
    order = list(reversed(range(len(prompts))))
    backward = compute_response_means(
        tiny_loaded, [prompts[i] for i in order], [responses[i] for i in order], 2, batch_tokens=64, progress=False
    )
    assert _max_relative_error(backward, forward[order]) < 1e-5


def test_layer_zero_is_mean_of_response_embeddings(tiny_loaded, tiny_pairs):
    """Layer 0 is the embedding output, so the mean is exactly over the response tokens' embeddings:
    any prompt or padding position in the mask would change it."""
    prompts, responses = _inputs(tiny_pairs)
    items = build_teacher_forcing(tiny_loaded, prompts, responses, 2048)
    means = compute_response_means(tiny_loaded, prompts, responses, [0], batch_tokens=128, progress=False)
    embedding = tiny_loaded.model.get_input_embeddings().weight.detach()
    tok = tiny_loaded.tokenizer
    for i, it in enumerate(items):
        response_ids = it.input_ids[it.response_start : it.response_end]
        assert len(response_ids) == len(tok(responses[i], add_special_tokens=False)["input_ids"])
        expected = embedding[response_ids].mean(0)
        torch.testing.assert_close(means[i, 0], expected, rtol=1e-5, atol=1e-6)


def _count_calls(modules):
    counts = [0] * len(modules)
    handles = []
    for j, module in enumerate(modules):

        def hook(*_args, j=j):
            counts[j] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize(("layers", "blocks_run", "norm_runs"), [([1], 1, False), ([0], 0, False), ([2, 4], 4, True)])
def test_forward_stops_after_deepest_layer(tiny_loaded, tiny_pairs, layers, blocks_run, norm_runs):
    model = tiny_loaded.model
    blocks = list(get_decoder_layers(model))
    watched = [*blocks, model.model.norm, model.lm_head]
    counts, handles = _count_calls(watched)
    try:
        prompts, responses = _inputs(tiny_pairs)
        compute_response_means(tiny_loaded, prompts, responses, layers, batch_tokens=100_000, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    block_counts, norm_count, head_count = counts[:4], counts[4], counts[5]
    assert all(c == 1 for c in block_counts[:blocks_run])  # one batch: each needed block runs once
    assert all(c == 0 for c in block_counts[blocks_run:])
    assert (norm_count == 1) == norm_runs
    assert head_count == 0
    # the capture hooks were removed: a plain forward runs to the end again
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_bfloat16_forward_accumulates_in_float32(tiny_model_dir, tiny_pairs, tiny_loaded):
    bf16 = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    prompts, responses = _inputs(tiny_pairs)
    low = compute_response_means(bf16, prompts, responses, [2], progress=False)
    high = compute_response_means(tiny_loaded, prompts, responses, [2], progress=False)
    assert low.dtype == torch.float32
    # bf16 forward: close to the float32 model, but not equal (it really ran in bf16)
    assert _max_relative_error(low, high) < 0.05
    assert not torch.equal(low, high)


def test_empty_response_and_nonfinite_rows(tiny_loaded):
    means = compute_response_means(tiny_loaded, ["Hi", "Hi"], ["Hello there.", ""], [1, 4], progress=False)
    assert nonfinite_rows(means).tolist() == [False, True]
    assert torch.isnan(means[1]).all()
    nothing = TeacherForced(input_ids=[], response_start=0, response_end=0, truncated=False)
    (item,) = build_teacher_forcing(tiny_loaded, ["Hi"], ["Hello there."], 2048)
    mixed = compute_means_from_teacher_forced(tiny_loaded, [nothing, item, nothing], [1, 4], progress=False)
    assert nonfinite_rows(mixed).tolist() == [True, False, True]
    torch.testing.assert_close(mixed[1], means[0])
    values = torch.zeros(4, 2, 3)
    values[1, 0, 2] = float("inf")
    values[3, 1, 0] = float("nan")
    assert nonfinite_rows(values).tolist() == [False, True, False, True]
    assert nonfinite_rows(torch.empty(0, 3)).shape == (0,)


def test_plan_batches_respects_budget():
    lengths = [5, 30, 7, 30, 12, 100, 1]
    batches = _plan_batches(lengths, batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert width * len(b) <= 60 or len(b) == 1  # an over-long sequence runs alone
        assert lengths[b[0]] == width  # longest first
    assert batches[0] == [5]


def test_compiled_blocks_give_the_same_means_and_are_restored(tiny_loaded, tiny_pairs):
    prompts, responses = _inputs(tiny_pairs)
    items = build_teacher_forcing(tiny_loaded, prompts[:4], responses[:4], 2048)
    plain = compute_means_from_teacher_forced(tiny_loaded, items, [0, 1], batch_tokens=4096, progress=False)
    compiled = compute_means_from_teacher_forced(
        tiny_loaded, items, [0, 1], batch_tokens=4096, progress=False, compile="eager"  # dynamo graph capture only
    )
    assert _max_relative_error(compiled, plain) < 1e-5
    blocks = get_decoder_layers(tiny_loaded.model)
    assert all("forward" not in vars(block) for block in blocks)  # the blocks' own forward is back


def test_results_are_independent_of_batch_composition(tiny_loaded, tiny_pairs):
    """Packed pairs, plain rows and batch budgets only change the grouping, never a mean."""
    from pairtrace.activations import compute_pair_means

    prompts = [p.prompt for p in tiny_pairs]
    chosen = build_teacher_forcing(tiny_loaded, prompts, [p.chosen for p in tiny_pairs], 2048)
    rejected = build_teacher_forcing(tiny_loaded, prompts, [p.rejected for p in tiny_pairs], 2048)
    base = compute_pair_means(tiny_loaded, chosen, rejected, [2], batch_tokens=1, progress=False)  # one row each
    for budget in (64, 100_000):
        for sharing in ("never", "always"):
            c, r = compute_pair_means(
                tiny_loaded, chosen, rejected, [2], batch_tokens=budget, prompt_sharing=sharing, progress=False
            )
            assert _max_relative_error(c, base[0]) < 1e-5
            finite = torch.isfinite(base[1]).all(dim=-1).squeeze(-1)
            assert _max_relative_error(r[finite], base[1][finite]) < 1e-5


def test_gpu_throughput_benchmark_dry_run(tmp_path, monkeypatch):
    """The GPU benchmark's CPU path: a tiny random OLMo 2, a one-second budget, JSON written to $OUT."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
    spec = importlib.util.spec_from_file_location("gpu_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main(["--dry-run", "--seconds", "0.2"]) == 0
    result = json.loads((tmp_path / "gpu_throughput.json").read_text())["results"][0]
    assert result["shape"] == "tiny" and result["device"] == "cpu" and result["layer"] == 3
    assert result["tokens_run"] < result["plain_tokens"]  # prompts were shared
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1 and result["efficiency_vs_floor"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extraction_benchmark_agrees_with_naive(dtype, capsys):
    """The extraction benchmark on a few pairs: pairtrace's vectors agree with the float32 naive method."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "extraction.py"
    spec = importlib.util.spec_from_file_location("extraction_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--n-pairs", "8", "--layer", "2", "--n-layers", "3", "--hidden", "64", "--repeats", "1", "--dtype", dtype]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert f"pairtrace and floor in {dtype}, naive in float32" in out and "vectors agree" in out
