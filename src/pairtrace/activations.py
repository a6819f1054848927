"""Batched, truncated, teacher-forced response means: ā(p, r; M, k) for many (p, r) at once.

One forward pass per batch runs only up to the deepest requested layer: forward hooks capture the needed
residual streams, fold them into float32 masked sums on the spot, and the deepest hook aborts the forward pass,
so no later block, no LM head and no ``hidden_states`` tuple is ever computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pairtrace.data.types import Message
from pairtrace.models import (
    LoadedModel,
    TeacherForced,
    build_teacher_forcing,
    get_decoder_layers,
    get_final_norm,
    resolve_layers,
)


class _StopForward(Exception):
    """Raised by the deepest capture hook to end a forward pass early."""


@dataclass
class _Capture:
    """Per-batch state shared by the capture hooks."""

    mask: torch.Tensor  # [B, T] float32, 1 on response tokens
    sums: torch.Tensor  # [B, L, d] float32 masked sums

    def add(self, slot: int, hidden: torch.Tensor) -> None:
        # hidden: [B, T, d] in the model dtype -> float32 sum over response positions: [B, d]
        self.sums[:, slot] = torch.einsum("bt,btd->bd", self.mask, hidden.float())


def _first_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output  # type: ignore[return-value]


def _install_hooks(
    model: nn.Module, layers: list[int], n_layers: int, get_capture: Callable[[], _Capture]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that write layer ``layers[slot]`` into the capture; the deepest one stops the forward pass."""
    blocks = get_decoder_layers(model)
    final_norm = get_final_norm(model)
    deepest = max(layers)
    handles = []
    for slot, k in enumerate(layers):
        stop = k == deepest
        if k == 0:
            # hidden_states[0] is the input of the first block (the embedding output).
            def pre_hook(module, args, kwargs, slot=slot, stop=stop):
                get_capture().add(slot, args[0] if args else kwargs["hidden_states"])
                if stop:
                    raise _StopForward

            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            continue
        target = final_norm if (k == n_layers and final_norm is not None) else blocks[k - 1]

        def hook(module, args, output, slot=slot, stop=stop):
            get_capture().add(slot, _first_tensor(output))
            if stop:
                raise _StopForward

        handles.append(target.register_forward_hook(hook))
    return handles


def _plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first), grouped so that padded length × rows stays within budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        padded = lengths[current[0]] if current else lengths[i]
        if current and padded * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _collate(batch: Sequence[TeacherForced], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and float response mask, each ``[B, T]``."""
    width = max(len(it.input_ids) for it in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(batch), width, dtype=torch.float32)  # [B, T]
    for row, it in enumerate(batch):
        input_ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids, dtype=torch.long)
        attention[row, : len(it.input_ids)] = 1
        mask[row, it.response_start : it.response_end] = 1.0
    return input_ids, attention, mask


def compute_means_from_teacher_forced(
    loaded: LoadedModel,
    items: Sequence[TeacherForced],
    layers: int | Sequence[int] | None,
    *,
    batch_tokens: int = 16384,
    progress: bool = True,
    desc: str = "response means",
) -> torch.Tensor:
    """Response means of already tokenised sequences (see :func:`compute_response_means`).

    Args:
        loaded: The model.
        items: Teacher-forced sequences from :func:`pairtrace.models.build_teacher_forcing`.
        layers: Layers to read (``None`` = default layer).
        batch_tokens: Token budget per forward pass (padded length × rows; a longer sequence runs alone).
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        Float32 tensor ``[n, len(layers), d]`` on the CPU, in input order; rows with no response token are NaN.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    n, d = len(items), loaded.hidden_size
    result = torch.empty(n, len(layers), d, dtype=torch.float32)  # [n, L, d]
    if n == 0:
        return result
    model, device = loaded.model, loaded.device
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = loaded.tokenizer.eos_token_id or 0
    state: dict[str, _Capture] = {}
    handles = _install_hooks(model, layers, loaded.n_layers, lambda: state["capture"])
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, disable=not progress, unit="seq") as bar:
            lengths = [len(it.input_ids) for it in items]
            empty = [i for i, length in enumerate(lengths) if length == 0]
            if empty:  # nothing to run: no response token, so no mean
                result[torch.tensor(empty)] = float("nan")
                bar.update(len(empty))
            runnable = [i for i, length in enumerate(lengths) if length > 0]
            for planned in _plan_batches([lengths[i] for i in runnable], batch_tokens):
                batch = [runnable[j] for j in planned]
                input_ids, attention, mask = _collate([items[i] for i in batch], pad_id)
                capture = _Capture(mask.to(device), torch.zeros(len(batch), len(layers), d, device=device))
                state["capture"] = capture
                with contextlib.suppress(_StopForward):
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
                counts = mask.sum(1).to(device)  # [B]
                means = capture.sums / counts[:, None, None]  # [B, L, d]; 0/0 = NaN for empty responses
                result[torch.tensor(batch)] = means.cpu()
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
    return result


def compute_response_means(
    loaded: LoadedModel,
    prompts: Sequence[str | Sequence[Message]],
    responses: Sequence[str],
    layers: int | Sequence[int] | None,
    *,
    batch_tokens: int = 16384,
    max_length: int = 2048,
    progress: bool = True,
    desc: str = "response means",
) -> torch.Tensor:
    """Mean layer-k activation over the response tokens of each teacher-forced (prompt, response).

    Sequences are sorted by length and packed into right-padded batches of at most ``batch_tokens``
    (padded length × rows); each forward pass stops after the deepest requested layer; masked sums are taken
    in float32 even when the model runs in bf16; the output is in input order.

    Args:
        loaded: The model.
        prompts: Prompts (turns before the response; a string is one user turn).
        responses: One response text per prompt.
        layers: Layers to read, ``0..n_layers`` (``None`` = default layer).
        batch_tokens: Token budget per forward pass.
        max_length: Maximum tokens per sequence (prompt cut from the left first, then the response's tail).
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        Float32 tensor ``[n, len(layers), d]`` on the CPU. Non-finite values are returned as they are (see
        :func:`nonfinite_rows`); a response with no tokens gives a NaN row.
    """
    items = build_teacher_forcing(loaded, prompts, responses, max_length)
    return compute_means_from_teacher_forced(
        loaded, items, layers, batch_tokens=batch_tokens, progress=progress, desc=desc
    )


def compute_response_means_reference(
    loaded: LoadedModel,
    prompts: Sequence[str | Sequence[Message]],
    responses: Sequence[str],
    layers: int | Sequence[int] | None,
    *,
    max_length: int = 2048,
    progress: bool = False,
    desc: str = "response means (reference)",
) -> torch.Tensor:
    """The naive method, for tests and benchmarks: one sequence at a time, full forward, all hidden states.

    Same inputs and output as :func:`compute_response_means`.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    items = build_teacher_forcing(loaded, prompts, responses, max_length)
    result = torch.empty(len(items), len(layers), loaded.hidden_size, dtype=torch.float32)  # [n, L, d]
    with torch.inference_mode():
        for i, it in enumerate(tqdm(items, desc=desc, disable=not progress, unit="seq")):
            ids = torch.tensor([it.input_ids], device=loaded.device)  # [1, T]
            out = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            for slot, k in enumerate(layers):
                hidden = out.hidden_states[k][0, it.response_start : it.response_end].float()  # [r, d]
                result[i, slot] = hidden.mean(0).cpu()
    return result


def nonfinite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Bool ``[n]``: rows (first dimension) that hold any NaN or infinity."""
    if tensor.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return ~torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1)
