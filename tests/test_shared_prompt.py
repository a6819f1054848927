"""Tests for pairtrace.shared_prompt and the packed path of pairtrace.activations: equality with the plain path."""

from __future__ import annotations

import logging

import pytest
import torch

from pairtrace.activations import (
    check_prompt_sharing,
    compute_means_from_teacher_forced,
    compute_pair_means,
    compute_response_means_reference,
    plan_pair_batches,
)
from pairtrace.errors import ConfigError
from pairtrace.models import TeacherForced, build_teacher_forcing, load_model
from pairtrace.shared_prompt import (
    can_share_prompt,
    collate_packed,
    pack_pair,
    plan_prompt_sharing,
    prompt_fraction,
    validate_prompt_sharing,
)
from testing_utils import assistant, user


def _items(loaded, pairs, max_length=2048):
    prompts = [p.prompt for p in pairs]
    chosen = build_teacher_forcing(loaded, prompts, [p.chosen for p in pairs], max_length)
    rejected = build_teacher_forcing(loaded, prompts, [p.rejected for p in pairs], max_length)
    return chosen, rejected


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-12)).nan_to_num(0.0).max())


def _tf(prompt: list[int], response: list[int]) -> TeacherForced:
    return TeacherForced(prompt + response, len(prompt), len(prompt) + len(response), False)


def test_plan_prompt_sharing_by_length_and_truncation():
    long_prompt = _tf(list(range(1, 31)), [40, 41])  # P = 30, C = 2
    long_rejected = _tf(list(range(1, 31)), [50, 51, 52])
    short_prompt = _tf([1, 2], list(range(40, 70)))  # P = 2, C = 30
    short_rejected = _tf([1, 2], list(range(70, 90)))
    cut = _tf([9, 3, 4], [40])  # the same prompt cut differently by max_length
    cut_rejected = _tf([9, 4], [50, 51])
    chosen, rejected = [long_prompt, short_prompt, cut], [long_rejected, short_rejected, cut_rejected]
    assert prompt_fraction(long_prompt, long_rejected) == pytest.approx(30 / 65)
    assert plan_prompt_sharing(chosen, rejected, "auto") == [True, False, False]
    assert plan_prompt_sharing(chosen, rejected, "always") == [True, True, False]
    assert plan_prompt_sharing(chosen, rejected, "never") == [False, False, False]
    assert plan_prompt_sharing(chosen, rejected, "auto", min_prompt_fraction=0.0) == [True, True, False]
    assert not can_share_prompt(cut, cut_rejected)
    assert not can_share_prompt(_tf([], [1]), _tf([], [2]))  # nothing to share
    with pytest.raises(ConfigError, match="cannot be packed"):
        pack_pair(cut, cut_rejected)
    with pytest.raises(ConfigError, match="prompt_sharing 'sometimes'"):
        validate_prompt_sharing("sometimes")


def test_collate_packed_mask_and_positions():
    a = pack_pair(_tf([1, 2, 3], [4, 5]), _tf([1, 2, 3], [6]))  # P=3, C=2, R=1 -> 6 tokens
    b = pack_pair(_tf([1, 2], [7]), _tf([1, 2], [8, 9]))  # P=2, C=1, R=2 -> 5 tokens (1 padding)
    ids, mask, positions, segments = collate_packed([a, b], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9, 0]]
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 3]  # the rejected branch restarts after the prompt
    assert positions[1, :5].tolist() == [0, 1, 2, 2, 3]
    assert segments[0].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    allowed = mask[0, 0]  # [T, T] query x key
    assert allowed[5].tolist() == [True, True, True, False, False, True]  # rejected sees the prompt, not chosen
    assert allowed[4].tolist() == [True, True, True, True, True, False]  # chosen sees the prompt and itself
    assert not allowed.triu(1).any()  # causal
    assert mask[1, 0, 5, 5]  # padding attends to itself: no fully masked row (no NaN)
    assert not mask[1, 0, :5, 5].any()  # no real token attends to padding
    _, additive, _, _ = collate_packed([a, b], pad_id=0, mask_dtype=torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, mask)


@pytest.mark.parametrize("max_length", [40, 2048])
def test_packed_equals_plain_path(tiny_loaded, tiny_pairs, max_length):
    """At 40 tokens some prompts are cut differently for chosen and rejected: those pairs run plain."""
    chosen, rejected = _items(tiny_loaded, tiny_pairs, max_length)
    layers = [0, 1, 3, 4]
    plan = plan_pair_batches(tiny_loaded, chosen, rejected, batch_tokens=96, prompt_sharing="always")
    same_prompt = [can_share_prompt(c, r) for c, r in zip(chosen, rejected, strict=True)]
    assert plan.shared == [s and not same for s, same in zip(same_prompt, plan.identical, strict=True)]
    assert sum(plan.shared) == (4 if max_length == 40 else 7)  # packed pairs really run
    assert any(c.truncated or r.truncated for c, r in zip(chosen, rejected, strict=True)) == (max_length == 40)
    assert plan.n_tokens < plan.n_plain_tokens
    packed_c, packed_r = compute_pair_means(
        tiny_loaded, chosen, rejected, layers, batch_tokens=96, prompt_sharing="always", progress=False
    )
    plain_c = compute_means_from_teacher_forced(tiny_loaded, chosen, layers, progress=False)
    plain_r = compute_means_from_teacher_forced(tiny_loaded, rejected, layers, progress=False)
    assert _relative_error(packed_c, plain_c) < 1e-5
    assert _relative_error(packed_r, plain_r) < 1e-5
    never_c, never_r = compute_pair_means(
        tiny_loaded, chosen, rejected, layers, batch_tokens=96, prompt_sharing="never", progress=False
    )
    assert _relative_error(never_c, plain_c) < 1e-5 and _relative_error(never_r, plain_r) < 1e-5
    if max_length == 40:  # the plain path is checked against the naive reference in test_activations
        prompts = [p.prompt for p in tiny_pairs]
        reference = compute_response_means_reference(
            tiny_loaded, prompts, [p.rejected for p in tiny_pairs], layers, max_length=max_length
        )
        assert _relative_error(packed_r, reference) < 1e-5


def test_identical_sides_give_exactly_zero_and_run_once(tiny_loaded):
    prompt = (user("Say hello."),)
    chosen, rejected = _items_from(tiny_loaded, [(prompt, "hello there", "hello there"), (prompt, "hi", "")])
    plan = plan_pair_batches(tiny_loaded, chosen, rejected, prompt_sharing="always")
    assert plan.identical == [True, False]
    assert plan.n_tokens == plan.n_plain_tokens - len(rejected[0].input_ids) - rejected[1].response_start
    c, r = compute_pair_means(tiny_loaded, chosen, rejected, [2, 4], prompt_sharing="always", progress=False)
    assert torch.equal(c[0], r[0])  # v_d = 0 exactly: no direction
    assert torch.isfinite(c[1]).all() and torch.isnan(r[1]).all()  # an empty response has no mean


def _items_from(loaded, triples):
    prompts = [t[0] for t in triples]
    return (
        build_teacher_forcing(loaded, prompts, [t[1] for t in triples], 2048),
        build_teacher_forcing(loaded, prompts, [t[2] for t in triples], 2048),
    )


def test_long_multi_turn_prompt_is_shared_automatically(tiny_loaded):
    turns = []
    for i in range(6):
        turns += [user(f"Question {i}: tell me about the sea and the weather."), assistant("The sea is blue.")]
    prompt = (*turns, user("And now?"))
    long_answer = "Here is a list of three ideas for a birthday party. " * 3
    chosen, rejected = _items_from(
        tiny_loaded, [(prompt, "Sunny.", "No."), ((user("Hi"),), long_answer, "The quick brown fox jumps. " * 3)]
    )
    plan = plan_pair_batches(tiny_loaded, chosen, rejected)  # auto
    assert plan.shared == [True, False]
    _, r = compute_pair_means(tiny_loaded, chosen, rejected, [1, 3], progress=False)
    plain_r = compute_means_from_teacher_forced(tiny_loaded, rejected, [1, 3], progress=False)
    assert _relative_error(r, plain_r) < 1e-5


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_and_bf16(tiny_model_dir, tiny_pairs, implementation):
    loaded = load_model(tiny_model_dir, device="cpu")
    loaded.model.set_attn_implementation(implementation)
    assert check_prompt_sharing(loaded)[0]
    chosen, rejected = _items(loaded, tiny_pairs)
    packed = compute_pair_means(loaded, chosen, rejected, [2, 4], prompt_sharing="always", progress=False)
    plain = compute_pair_means(loaded, chosen, rejected, [2, 4], prompt_sharing="never", progress=False)
    assert _relative_error(packed[1], plain[1]) < 1e-5
    if implementation == "eager":
        return  # bf16 once is enough
    bf16 = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    bf16.model.set_attn_implementation(implementation)
    low = compute_pair_means(bf16, chosen, rejected, [2, 4], prompt_sharing="always", progress=False)
    assert low[1].dtype == torch.float32
    assert _relative_error(low[1], plain[1]) < 0.05  # bf16 forward, float32 sums


def test_unsupported_attention_falls_back_or_refuses(tiny_model_dir, tiny_pairs, caplog):
    loaded = load_model(tiny_model_dir, device="cpu")
    loaded.model.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask (never run here)
    chosen, rejected = _items(loaded, tiny_pairs)
    with caplog.at_level(logging.WARNING, logger="pairtrace.activations"):
        plan = plan_pair_batches(loaded, chosen, rejected, prompt_sharing="auto", min_prompt_fraction=0.0)
    assert not any(plan.shared)
    assert "prompt sharing is off" in caplog.text and "flash_attention_2" in caplog.text
    with pytest.raises(ConfigError, match=r"always.*not possible"):
        plan_pair_batches(loaded, chosen, rejected, prompt_sharing="always")
