"""Batched, truncated, teacher-forced response means: ā(p, r; M, k) for many (p, r) at once.

One forward pass per batch runs only up to the deepest requested layer: forward hooks capture the needed
residual streams, fold them into float32 masked sums on the spot, and the deepest hook aborts the forward pass,
so no later block, no LM head and no ``hidden_states`` tuple is ever computed.

Throughput measures, all on by default where they apply:

- sequences are sorted by length and packed into right-padded batches under a token budget (padded length ×
  rows), so padding stays small and the batch size adapts to the length;
- a preference pair's two sequences share their prompt (:mod:`pairtrace.shared_prompt`): one packed forward
  pass of ``P + C + R`` tokens instead of two of ``P + C`` and ``P + R``, where the prompt is long enough to pay;
- the model runs in its own dtype (bf16/fp16 on GPU) while the masked sums accumulate in float32;
- on CUDA, inputs are copied from pinned memory without blocking and results stay on the device until the end,
  so the host prepares the next batch while the device computes; there is no per-token Python work;
- ``compile=True`` compiles the decoder blocks that run (``torch.compile``), leaving the hooks outside the graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pairtrace.data.types import Message
from pairtrace.errors import ConfigError
from pairtrace.models import (
    LoadedModel,
    TeacherForced,
    build_teacher_forcing,
    get_decoder_layers,
    get_final_norm,
    pad_token_id,
    resolve_layers,
)
from pairtrace.pooling import MEAN, ResponsePooling
from pairtrace.shared_prompt import (
    DEFAULT_MIN_PROMPT_FRACTION,
    MASK_IMPLEMENTATIONS,
    PackedPair,
    attention_implementation,
    cached_prompt_sharing_check,
    collate_packed,
    explain_unsupported,
    mask_dtype_for,
    pack_pair,
    plan_prompt_sharing,
    probe_sequences,
    record_prompt_sharing_check,
    sharing_tolerance,
    validate_prompt_sharing,
)

logger = logging.getLogger(__name__)

class _StopForward(Exception):
    """Raised by the deepest capture hook to end a forward pass early."""


@dataclass
class _Capture:
    """Per-batch state shared by the capture hooks."""

    masks: torch.Tensor  # [B, S, T] float32 pooling weights of the tokens of segment s (a response), 0 elsewhere
    sums: torch.Tensor  # [B, S, L, d] float32 weighted sums

    def add(self, slot: int, hidden: torch.Tensor) -> None:
        # hidden: [B, T, d] in the model dtype -> float32 sums over each segment's positions: [B, S, d]
        self.sums[:, :, slot] = torch.einsum("bst,btd->bsd", self.masks, hidden.float())


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


DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}
"""Token budget per forward pass when none is given, by device type. Measured on CPU (benchmarks/README.md):
small batches keep attention and activations in cache (2048 tokens ran 2-3x faster than 16384); a GPU needs
large ones to fill it."""


def default_batch_tokens(device: torch.device | str) -> int:
    """The default token budget per forward pass for a device (see :data:`DEFAULT_BATCH_TOKENS`)."""
    return DEFAULT_BATCH_TOKENS.get(torch.device(device).type, 4096)


def resolve_batch_tokens(batch_tokens: int | None, device: torch.device | str) -> int:
    """``batch_tokens``, or the device's default when it is ``None``.

    Raises:
        ConfigError: A budget below 1.
    """
    if batch_tokens is None:
        return default_batch_tokens(device)
    if batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be at least 1, got {batch_tokens}")
    return int(batch_tokens)


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


def _collate(
    batch: Sequence[TeacherForced], pad_id: int, pooling: ResponsePooling = MEAN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and float response mask (the pooling's weight on each
    response token), each ``[B, T]``."""
    width = max(len(it.input_ids) for it in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(batch), width, dtype=torch.float32)  # [B, T]
    for row, it in enumerate(batch):
        input_ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids, dtype=torch.long)
        attention[row, : len(it.input_ids)] = 1
        mask[row, it.response_start : it.response_end] = pooling.weights(it.n_response_tokens)
    return input_ids, attention, mask


@dataclass
class ForwardBatch:
    """One collated forward pass and where its response means go.

    Attributes:
        input_ids: ``[B, T]`` token ids, right-padded.
        attention_mask: ``[B, T]`` padding mask (plain rows) or ``[B, 1, T, T]`` custom mask (packed pairs).
        position_ids: ``[B, T]`` for packed pairs; ``None`` for plain rows (positions ``0..T-1``).
        masks: ``[B, S, T]`` float32 pooling weights of the tokens of segment ``s`` (S = 1 plain, 2 packed: chosen,
            rejected), 0 elsewhere.
        targets: ``[B, S]`` long: the output row of each segment's mean.
        n_tokens: Real (non-padding) tokens in the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    masks: torch.Tensor
    targets: torch.Tensor
    n_tokens: int = 0

    def to(self, device: torch.device) -> ForwardBatch:
        """The batch on ``device``; on CUDA through pinned memory, without blocking the host."""
        if device.type != "cuda":
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory().to(device, non_blocking=True)

        return ForwardBatch(
            move(self.input_ids), move(self.attention_mask), move(self.position_ids), move(self.masks),
            move(self.targets), self.n_tokens,
        )


class _Runner:
    """Capture hooks (and optionally compiled blocks) installed on a model for the duration of one call."""

    def __init__(
        self, loaded: LoadedModel, layers: list[int], compile: bool | str = False, pooling: ResponsePooling = MEAN
    ) -> None:
        self.loaded = loaded
        self.layers = layers
        self.compile = compile
        self.pooling = pooling
        self._capture: _Capture | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._compiled: list[tuple[nn.Module, object]] = []

    def __enter__(self) -> _Runner:
        model = self.loaded.model
        self._handles = _install_hooks(model, self.layers, self.loaded.n_layers, lambda: self._capture)
        if self.compile:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            for block in list(get_decoder_layers(model))[: max(self.layers)]:
                # compile the block's own forward: the hooks stay outside the compiled graph
                self._compiled.append((block, block.__dict__.get("forward")))
                block.forward = torch.compile(block.forward, backend=backend, dynamic=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for block, previous in self._compiled:
            if previous is None:
                del block.forward
            else:
                block.forward = previous
        self._handles, self._compiled, self._capture = [], [], None

    def means(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one batch (already on the device): pooled responses ``[B, S, L, d]`` float32, NaN if empty."""
        rows, segments = batch.masks.shape[:2]
        device = batch.input_ids.device
        self._capture = _Capture(
            batch.masks, torch.zeros(rows, segments, len(self.layers), self.loaded.hidden_size, device=device)
        )
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
        if batch.position_ids is not None:
            kwargs["position_ids"] = batch.position_ids
        with contextlib.suppress(_StopForward):
            self.loaded.model(**kwargs)
        return self.pooling.reduce(self._capture.sums, batch.masks)  # [B, S, L, d]; NaN for empty responses


def _run_batches(
    loaded: LoadedModel,
    layers: list[int],
    batches: Iterator[ForwardBatch],
    n_rows: int,
    *,
    compile: bool | str,
    bar: tqdm,
    pooling: ResponsePooling = MEAN,
) -> torch.Tensor:
    """Run batches, scattering each segment's pooled vector into row ``targets`` of a ``[n_rows, L, d]`` result
    (``pooling`` must be the one the batches' masks were collated with)."""
    device = loaded.device
    result = torch.full((n_rows, len(layers), loaded.hidden_size), float("nan"), device=device)  # [n, L, d]
    with torch.inference_mode(), _Runner(loaded, layers, compile, pooling) as runner:
        for batch in batches:
            moved = batch.to(device)
            means = runner.means(moved)  # [B, S, L, d]
            result.index_copy_(0, moved.targets.reshape(-1), means.flatten(0, 1))
            bar.update(int(batch.targets.numel()))
    return result.cpu()


def _plain_batches(
    items: Sequence[TeacherForced], rows: Sequence[int], targets: Sequence[int], batch_tokens: int, pad_id: int,
    pooling: ResponsePooling = MEAN,
) -> Iterator[ForwardBatch]:
    """Plain batches of ``items[rows[j]]``, each sequence's mean going to output row ``targets[j]``."""
    lengths = [len(items[i].input_ids) for i in rows]
    for planned in _plan_batches(lengths, batch_tokens):
        input_ids, attention, mask = _collate([items[rows[j]] for j in planned], pad_id, pooling)
        yield ForwardBatch(
            input_ids, attention, None, mask[:, None], torch.tensor([[targets[j]] for j in planned], dtype=torch.long),
            sum(lengths[j] for j in planned),
        )


def _packed_batches(
    packed: Sequence[PackedPair], targets: Sequence[tuple[int, int]], batch_tokens: int, pad_id: int,
    mask_dtype: torch.dtype, pooling: ResponsePooling = MEAN,
) -> Iterator[ForwardBatch]:
    """Batches of packed pairs; ``targets[j]`` are the output rows of pair j's chosen and rejected means."""
    for planned in _plan_batches([len(p) for p in packed], batch_tokens):
        input_ids, attention, positions, masks = collate_packed(
            [packed[j] for j in planned], pad_id, mask_dtype, pooling
        )
        yield ForwardBatch(
            input_ids, attention, positions, masks, torch.tensor([targets[j] for j in planned], dtype=torch.long),
            sum(len(packed[j]) for j in planned),
        )


def compute_means_from_teacher_forced(
    loaded: LoadedModel,
    items: Sequence[TeacherForced],
    layers: int | Sequence[int] | None,
    *,
    batch_tokens: int | None = None,
    progress: bool = True,
    desc: str = "response means",
    compile: bool | str = False,
    pooling: ResponsePooling = MEAN,
) -> torch.Tensor:
    """Response means of already tokenised sequences (see :func:`compute_response_means`).

    Args:
        loaded: The model.
        items: Teacher-forced sequences from :func:`pairtrace.models.build_teacher_forcing`.
        layers: Layers to read (``None`` = default layer).
        batch_tokens: Token budget per forward pass (padded length × rows; a longer sequence runs alone);
            ``None``: the device's default (:func:`default_batch_tokens`).
        progress: Show a progress bar.
        desc: Progress bar label.
        compile: Compile the decoder blocks that run with ``torch.compile`` (``True`` = inductor, or a backend
            name).
        pooling: The response pooling the items were built with.

    Returns:
        Float32 tensor ``[n, len(layers), d]`` on the CPU, in input order; rows with no response token are NaN.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    batch_tokens = resolve_batch_tokens(batch_tokens, loaded.device)
    n = len(items)
    if n == 0:
        return torch.empty(0, len(layers), loaded.hidden_size, dtype=torch.float32)
    runnable = [i for i, it in enumerate(items) if len(it.input_ids) > 0]  # an empty item has no mean: NaN
    with tqdm(total=n, desc=desc, disable=not progress, unit="seq") as bar:
        bar.update(n - len(runnable))
        batches = _plain_batches(items, runnable, runnable, batch_tokens, pad_token_id(loaded.tokenizer), pooling)
        return _run_batches(loaded, layers, batches, n, compile=compile, bar=bar, pooling=pooling)


def check_prompt_sharing(loaded: LoadedModel) -> tuple[bool, float | None]:
    """Verify once per model that packed pairs give the plain path's activations.

    Runs a short synthetic pair both ways through the whole model (every layer compared) and compares the response
    means; the outcome is remembered for the model object.

    Returns:
        ``(supported, largest relative difference)``; the difference is ``None`` when the attention
        implementation cannot take a custom mask at all.
    """
    cached = cached_prompt_sharing_check(loaded)
    if cached is not None:
        return cached, None
    if attention_implementation(loaded) not in MASK_IMPLEMENTATIONS:
        record_prompt_sharing_check(loaded, False)
        return False, None
    chosen, rejected = probe_sequences(loaded)
    layers = list(range(loaded.n_layers + 1))
    try:
        with tqdm(disable=True) as bar:
            plain = _run_batches(
                loaded, layers,
                _plain_batches([chosen, rejected], [0, 1], [0, 1], 1 << 30, pad_token_id(loaded.tokenizer)), 2,
                compile=False, bar=bar,
            )
            packed = _run_batches(
                loaded, layers,
                _packed_batches([pack_pair(chosen, rejected)], [(0, 1)], 1 << 30, pad_token_id(loaded.tokenizer),
                                mask_dtype_for(loaded)),
                2, compile=False, bar=bar,
            )
    except Exception as exc:  # a model whose forward rejects a 4D mask or position ids: not supported
        logger.debug("prompt-sharing check failed with %r", exc)
        record_prompt_sharing_check(loaded, False)
        return False, float("inf")
    error = float(((packed - plain).norm(dim=-1) / plain.norm(dim=-1).clamp_min(1e-12)).max())
    ok = error <= sharing_tolerance(loaded.dtype)
    record_prompt_sharing_check(loaded, ok)
    return ok, error


@dataclass
class PairBatchPlan:
    """How the sequences of m pairs are batched (see :func:`plan_pair_batches`).

    Attributes:
        chosen: ``[prompt, chosen]`` sequences.
        rejected: ``[prompt, rejected]`` sequences.
        shared: Per pair, whether it runs packed with a shared prompt.
        identical: Per pair, whether chosen and rejected are the same tokens: only the chosen sequence runs and
            the rejected side gets exactly its mean (so the pair's vector is exactly zero).
        batch_tokens: Token budget per forward pass.
        pad_id: Padding token id.
        mask_dtype: Dtype of the packed pairs' 4D attention masks.
        pooling: The response pooling the sequences were built with.
    """

    chosen: Sequence[TeacherForced]
    rejected: Sequence[TeacherForced]
    shared: list[bool]
    identical: list[bool]
    batch_tokens: int
    pad_id: int
    mask_dtype: torch.dtype
    pooling: ResponsePooling = MEAN

    @property
    def n_pairs(self) -> int:
        """Number of pairs."""
        return len(self.shared)

    @property
    def n_plain_tokens(self) -> int:
        """Tokens of two plain sequences per pair."""
        return sum(len(c.input_ids) + len(r.input_ids) for c, r in zip(self.chosen, self.rejected, strict=True))

    @property
    def n_tokens(self) -> int:
        """Tokens actually run (a shared prompt counts once, an identical rejected sequence not at all)."""
        saved = sum(c.response_start for c, s in zip(self.chosen, self.shared, strict=True) if s)
        saved += sum(len(r.input_ids) for r, same in zip(self.rejected, self.identical, strict=True) if same)
        return self.n_plain_tokens - saved

    def batches(self) -> Iterator[ForwardBatch]:
        """Collate the batches lazily: packed pairs first, then plain sequences; output rows are
        ``i`` (chosen of pair i) and ``m + i`` (rejected of pair i)."""
        m = self.n_pairs
        shared = [i for i in range(m) if self.shared[i]]
        if shared:
            packed = [pack_pair(self.chosen[i], self.rejected[i]) for i in shared]
            yield from _packed_batches(packed, [(i, m + i) for i in shared], self.batch_tokens, self.pad_id,
                                       self.mask_dtype, self.pooling)
        plain = [i for i in range(m) if not self.shared[i]]
        items = list(self.chosen) + list(self.rejected)
        rows = [i for i in plain if items[i].input_ids]
        rows += [m + i for i in plain if items[m + i].input_ids and not self.identical[i]]
        yield from _plain_batches(items, rows, rows, self.batch_tokens, self.pad_id, self.pooling)


def plan_pair_batches(
    loaded: LoadedModel,
    chosen: Sequence[TeacherForced],
    rejected: Sequence[TeacherForced],
    *,
    batch_tokens: int | None = None,
    prompt_sharing: str = "auto",
    min_prompt_fraction: float = DEFAULT_MIN_PROMPT_FRACTION,
    pooling: ResponsePooling = MEAN,
) -> PairBatchPlan:
    """Decide which pairs share their prompt and how the forward passes are batched.

    Args:
        loaded: The model.
        chosen: ``[prompt, chosen]`` sequences.
        rejected: ``[prompt, rejected]`` sequences, aligned with ``chosen``.
        batch_tokens: Token budget per forward pass (padded length × rows); ``None``: the device's default.
        prompt_sharing: ``auto`` (share where :func:`pairtrace.shared_prompt.plan_prompt_sharing` says it pays),
            ``always`` (every pair whose prompts match in tokens) or ``never``.
        min_prompt_fraction: Threshold of ``auto``.
        pooling: The response pooling the sequences were built with.

    Returns:
        The plan.

    Raises:
        ConfigError: ``always`` on a model that does not honour custom 4D masks (checked once per model), or a
            bad mode.
    """
    validate_prompt_sharing(prompt_sharing)
    batch_tokens = resolve_batch_tokens(batch_tokens, loaded.device)
    identical = [c.input_ids == r.input_ids for c, r in zip(chosen, rejected, strict=True)]
    shared = plan_prompt_sharing(chosen, rejected, prompt_sharing, min_prompt_fraction)
    shared = [s and not same for s, same in zip(shared, identical, strict=True)]
    if any(shared):
        ok, error = check_prompt_sharing(loaded)
        if not ok:
            reason = explain_unsupported(loaded, error)
            if prompt_sharing == "always":
                raise ConfigError(f"prompt_sharing='always' is not possible: {reason}")
            logger.warning("prompt sharing is off: %s", reason)
            shared = [False] * len(shared)
    return PairBatchPlan(chosen, rejected, shared, identical, batch_tokens, pad_token_id(loaded.tokenizer),
                         mask_dtype_for(loaded), pooling)


def compute_pair_means(
    loaded: LoadedModel,
    chosen: Sequence[TeacherForced],
    rejected: Sequence[TeacherForced],
    layers: int | Sequence[int] | None,
    *,
    batch_tokens: int | None = None,
    prompt_sharing: str = "auto",
    min_prompt_fraction: float = DEFAULT_MIN_PROMPT_FRACTION,
    compile: bool | str = False,
    progress: bool = True,
    desc: str = "pair means",
    pooling: ResponsePooling = MEAN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response means of the chosen and rejected sequences of preference pairs, sharing prompts where it pays.

    Equal to two calls of :func:`compute_means_from_teacher_forced` up to floating-point summation order
    (relative differences around 1e-6 in float32).

    Args:
        loaded: The model.
        chosen: ``[prompt, chosen]`` sequences from :func:`pairtrace.models.build_teacher_forcing`.
        rejected: ``[prompt, rejected]`` sequences, aligned with ``chosen``.
        layers: Layers to read (``None`` = default layer).
        batch_tokens: Token budget per forward pass (``None``: the device's default).
        prompt_sharing: ``auto``, ``always`` or ``never`` (see :func:`plan_pair_batches`).
        min_prompt_fraction: Threshold of ``auto``.
        compile: Compile the decoder blocks (see :func:`compute_means_from_teacher_forced`).
        progress: Show a progress bar.
        desc: Progress bar label.
        pooling: The response pooling the sequences were built with.

    Returns:
        ``(chosen_means, rejected_means)``, each float32 ``[m, len(layers), d]`` on the CPU; a response with no
        tokens gives a NaN row.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    m = len(chosen)
    plan = plan_pair_batches(
        loaded, chosen, rejected, batch_tokens=batch_tokens, prompt_sharing=prompt_sharing,
        min_prompt_fraction=min_prompt_fraction, pooling=pooling,
    )
    if m == 0:
        empty = torch.empty(0, len(layers), loaded.hidden_size, dtype=torch.float32)
        return empty, empty.clone()
    with tqdm(total=2 * m, desc=desc, disable=not progress, unit="seq") as bar:
        not_run = sum(1 for it in chosen if not it.input_ids)
        not_run += sum(1 for it, same in zip(rejected, plan.identical, strict=True) if same or not it.input_ids)
        bar.update(not_run)
        both = _run_batches(
            loaded, layers, plan.batches(), 2 * m, compile=compile, bar=bar, pooling=pooling
        )  # [2m, L, d]
    same = torch.tensor(plan.identical, dtype=torch.bool)
    rejected_means = torch.where(same[:, None, None], both[:m], both[m:])  # an identical side: exactly the same mean
    return both[:m], rejected_means


def compute_response_means(
    loaded: LoadedModel,
    prompts: Sequence[str | Sequence[Message]],
    responses: Sequence[str],
    layers: int | Sequence[int] | None,
    *,
    batch_tokens: int | None = None,
    max_length: int = 2048,
    progress: bool = True,
    desc: str = "response means",
    response_tokens: int | None = None,
    pooling: ResponsePooling | None = None,
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
        batch_tokens: Token budget per forward pass (``None``: the device's default).
        max_length: Maximum tokens per sequence (prompt cut from the left first, then the response's tail).
        progress: Show a progress bar.
        desc: Progress bar label.
        response_tokens: Average each response's first this many tokens only (``None``: all).
        pooling: The response pooling (instead of ``response_tokens``).

    Returns:
        Float32 tensor ``[n, len(layers), d]`` on the CPU. Non-finite values are returned as they are (see
        :func:`nonfinite_rows`); a response with no tokens gives a NaN row.
    """
    pooling = ResponsePooling.resolve(pooling, response_tokens)
    items = build_teacher_forcing(loaded, prompts, responses, max_length, pooling=pooling)
    return compute_means_from_teacher_forced(
        loaded, items, layers, batch_tokens=batch_tokens, progress=progress, desc=desc, pooling=pooling
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
