"""Shared-prompt packing: one forward pass per pair instead of two, with the prompt computed once.

Chosen and rejected share their prompt. Instead of running ``[prompt, chosen]`` and ``[prompt, rejected]`` as two
sequences, a pair is packed into ONE sequence ``[prompt, chosen, rejected]`` with

- a custom 4D attention mask: every token attends causally to its own branch and to the prompt, never to the
  other branch (so the rejected tokens do not see the chosen ones);
- position ids that restart for the rejected branch: ``0..P-1`` (prompt), ``P..P+C-1`` (chosen),
  ``P..P+R-1`` (rejected), exactly the positions the two plain sequences have.

Each response token therefore sees exactly the keys, values and positions it sees in its plain sequence, and its
activations are equal up to floating-point summation order. The forward pass costs ``P + C + R`` tokens instead of
``2P + C + R``: it pays when prompts are long compared with responses (multi-turn chats), and costs extra
attention when they are short, so the choice is made per pair (:func:`plan_prompt_sharing`).

This is the packed equivalent of "encode the prompt once and reuse its key/value cache for both responses": the
same saving, with no cache object to copy per row, one forward pass per batch, and the same early stop after the
deepest requested layer. It needs an attention implementation that honours a custom 4D mask and explicit
position ids (``sdpa`` and ``eager`` in Hugging Face); :func:`check_prompt_sharing` verifies it once per model.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pairtrace.errors import ConfigError
from pairtrace.models import LoadedModel, TeacherForced
from pairtrace.pooling import MEAN, ResponsePooling

logger = logging.getLogger(__name__)

PROMPT_SHARING_MODES = ("auto", "always", "never")
"""``auto``: share where it pays (see :data:`DEFAULT_MIN_PROMPT_FRACTION`); ``always``: share every pair whose
two sequences have the same prompt tokens; ``never``: two plain sequences per pair."""

DEFAULT_MIN_PROMPT_FRACTION = 0.2
"""``auto`` shares a pair's prompt when the prompt is at least this fraction of the pair's plain tokens
(``P / (2P + C + R)``, the fraction of tokens saved). Measured on CPU (``benchmarks/shared_prompt.py``): packing
broke even at 0.15 (the longer packed sequences cost extra attention) and gained 1.24x at 0.25, 1.45x at 0.45."""

MASK_IMPLEMENTATIONS = ("sdpa", "eager")
"""Attention implementations known to honour a custom 4D mask."""

_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PackedPair:
    """A pair packed as ``[prompt, chosen, rejected]`` token ids.

    Attributes:
        input_ids: Prompt, chosen and rejected tokens, in that order.
        prompt_length: ``P``.
        chosen_length: ``C`` (may be 0: that side's mean is then NaN, as on the plain path).
        rejected_length: ``R``.
    """

    input_ids: list[int]
    prompt_length: int
    chosen_length: int
    rejected_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def validate_prompt_sharing(mode: str) -> str:
    """Check a prompt-sharing mode name.

    Raises:
        ConfigError: Not one of :data:`PROMPT_SHARING_MODES`.
    """
    if mode not in PROMPT_SHARING_MODES:
        raise ConfigError(f"prompt_sharing {mode!r} is not one of {list(PROMPT_SHARING_MODES)}")
    return mode


def can_share_prompt(chosen: TeacherForced, rejected: TeacherForced) -> bool:
    """Whether the two sequences start with the same, non-empty prompt tokens (truncation may cut them apart)."""
    p = chosen.response_start
    return (
        p > 0
        and rejected.response_start == p
        and chosen.input_ids[:p] == rejected.input_ids[:p]
    )


def prompt_fraction(chosen: TeacherForced, rejected: TeacherForced) -> float:
    """Fraction of the pair's plain tokens that packing saves: ``P / (2P + C + R)``."""
    total = len(chosen.input_ids) + len(rejected.input_ids)
    return chosen.response_start / total if total else 0.0


def plan_prompt_sharing(
    chosen: Sequence[TeacherForced],
    rejected: Sequence[TeacherForced],
    mode: str = "auto",
    min_prompt_fraction: float = DEFAULT_MIN_PROMPT_FRACTION,
) -> list[bool]:
    """Decide, pair by pair, whether to pack the pair with a shared prompt.

    Args:
        chosen: Teacher-forced ``[prompt, chosen]`` sequences.
        rejected: Teacher-forced ``[prompt, rejected]`` sequences, aligned with ``chosen``.
        mode: One of :data:`PROMPT_SHARING_MODES`.
        min_prompt_fraction: ``auto`` shares pairs whose :func:`prompt_fraction` is at least this.

    Returns:
        One flag per pair; pairs whose two prompts differ in tokens (cut differently by ``max_length``) are
        never shared, whatever the mode.
    """
    validate_prompt_sharing(mode)
    if len(chosen) != len(rejected):
        raise ConfigError(f"{len(chosen)} chosen sequences but {len(rejected)} rejected ones")
    if mode == "never":
        return [False] * len(chosen)
    plan = []
    for c, r in zip(chosen, rejected, strict=True):
        ok = can_share_prompt(c, r)
        if ok and mode == "auto":
            ok = prompt_fraction(c, r) >= min_prompt_fraction
        plan.append(ok)
    return plan


def pack_pair(chosen: TeacherForced, rejected: TeacherForced) -> PackedPair:
    """Pack two sequences with the same prompt into ``[prompt, chosen, rejected]``.

    Raises:
        ConfigError: The prompts differ (see :func:`can_share_prompt`).
    """
    if not can_share_prompt(chosen, rejected):
        raise ConfigError("chosen and rejected do not start with the same prompt tokens; they cannot be packed")
    p = chosen.response_start
    return PackedPair(
        input_ids=chosen.input_ids + rejected.input_ids[p:],
        prompt_length=p,
        chosen_length=chosen.n_response_tokens,
        rejected_length=rejected.n_response_tokens,
    )


def collate_packed(
    batch: Sequence[PackedPair], pad_id: int, mask_dtype: torch.dtype = torch.bool, pooling: ResponsePooling = MEAN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tensors for a batch of packed pairs.

    Args:
        batch: Packed pairs.
        pad_id: Padding token id.
        mask_dtype: ``torch.bool`` (True = attend; for ``sdpa``) or a float dtype (additive: 0 or the dtype's
            minimum; for ``eager``).
        pooling: The response pooling; its weights fill the response masks.

    Returns:
        ``input_ids [B, T]``, ``attention_mask [B, 1, T, T]``, ``position_ids [B, T]`` and the float32 response
        masks ``[B, 2, T]`` (segment 0 = chosen tokens, 1 = rejected tokens; the pooling's weight on each token).
    """
    width = max(len(p) for p in batch)
    rows = len(batch)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # [B, T]
    position_ids = torch.zeros(rows, width, dtype=torch.long)  # [B, T]
    branch = torch.full((rows, width), _PAD, dtype=torch.long)  # [B, T]
    masks = torch.zeros(rows, 2, width, dtype=torch.float32)  # [B, 2, T]
    for row, packed in enumerate(batch):
        p, c, r = packed.prompt_length, packed.chosen_length, packed.rejected_length
        input_ids[row, : len(packed)] = torch.tensor(packed.input_ids, dtype=torch.long)
        position_ids[row, : p + c] = torch.arange(p + c)
        position_ids[row, p + c : p + c + r] = torch.arange(p, p + r)
        branch[row, :p] = _PROMPT
        branch[row, p : p + c] = _CHOSEN
        branch[row, p + c : p + c + r] = _REJECTED
        masks[row, 0, p : p + c] = pooling.weights(c)
        masks[row, 1, p + c : p + c + r] = pooling.weights(r)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # [T, T]: key <= query
    same = branch[:, :, None] == branch[:, None, :]  # [B, T, T]: same branch (padding sees padding)
    to_prompt = (branch == _PROMPT)[:, None, :]  # [B, 1, T]: every token may see the prompt
    allowed = (causal & (same | to_prompt))[:, None]  # [B, 1, T, T]; the diagonal is always allowed
    if mask_dtype == torch.bool:
        return input_ids, allowed, position_ids, masks
    additive = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    return input_ids, additive, position_ids, masks


def attention_implementation(loaded: LoadedModel) -> str:
    """The attention implementation of a loaded model (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    config = getattr(loaded.model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def mask_dtype_for(loaded: LoadedModel) -> torch.dtype:
    """Mask dtype the model's attention expects: bool for ``sdpa``, the model dtype (additive) for ``eager``."""
    return torch.bool if attention_implementation(loaded) == "sdpa" else loaded.dtype


def record_prompt_sharing_check(loaded: LoadedModel, ok: bool) -> None:
    """Remember the outcome of the equality check for this model object."""
    _CHECKED[loaded.model] = ok


def cached_prompt_sharing_check(loaded: LoadedModel) -> bool | None:
    """The remembered check outcome for this model object, or ``None`` if it has not been checked."""
    try:
        return _CHECKED.get(loaded.model)
    except TypeError:  # an object that cannot be weakly referenced: check every time
        return None


def probe_sequences(loaded: LoadedModel) -> tuple[TeacherForced, TeacherForced]:
    """A short synthetic pair (prompt of 6 tokens, responses of 4 and 3) for the equality check."""
    vocab = int(getattr(loaded.model.config, "vocab_size", 0) or len(loaded.tokenizer))
    ids = [(7 * i + 3) % vocab for i in range(13)]
    prompt, chosen, rejected = ids[:6], ids[6:10], ids[10:13]
    return (
        TeacherForced(prompt + chosen, 6, 10, False),
        TeacherForced(prompt + rejected, 6, 9, False),
    )


def sharing_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference accepted between packed and plain means in the equality check."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def explain_unsupported(loaded: LoadedModel, error: float | None) -> str:
    """Why prompt sharing is off for this model (for warnings and errors)."""
    impl = attention_implementation(loaded)
    if impl not in MASK_IMPLEMENTATIONS:
        return (
            f"attention implementation {impl!r} does not take a custom 4D mask (use one of "
            f"{list(MASK_IMPLEMENTATIONS)}, e.g. load the model with attn_implementation='sdpa')"
        )
    return (
        f"packed and plain activations of {type(loaded.model).__name__} differ (relative difference {error:.2e}): "
        "the model does not honour a custom 4D attention mask or explicit position ids"
    )


__all__ = [
    "DEFAULT_MIN_PROMPT_FRACTION",
    "MASK_IMPLEMENTATIONS",
    "PROMPT_SHARING_MODES",
    "PackedPair",
    "attention_implementation",
    "can_share_prompt",
    "collate_packed",
    "mask_dtype_for",
    "pack_pair",
    "plan_prompt_sharing",
    "prompt_fraction",
    "validate_prompt_sharing",
]
