"""Per-pair gradient features of the gradient baseline: per-sample LoRA gradients from one batched backward, Adam
preconditioning, a seeded block-wise random projection, and the mean target cosine."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from pairtrace.attribute import unit_rows
from pairtrace.baselines.lora_warmup import (
    EncodedPair,
    GradientCheckpoint,
    batches,
    compute_dpo_losses,
    load_checkpoint_weights,
    lora_linear_modules,
    lora_parameters,
    model_device,
    pair_logps,
)
from pairtrace.cost import CostMeter
from pairtrace.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pairtrace.baselines.gradient import GradientConfig

PROJECTION_SEED_ROWS = 1024

@contextmanager
def _capture_lora_io(modules: Sequence[nn.Linear]) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Record, for each LoRA Linear, its input x [B, T, in] and the gradient g [B, T, out] of its output."""
    records: list[dict[str, torch.Tensor]] = [{} for _ in modules]
    handles = []

    def make_hook(slot: dict[str, torch.Tensor]):
        def forward_hook(_module, inputs, output):
            slot["x"] = inputs[0].detach()

            def grad_hook(grad):
                slot["g"] = grad.detach()

            output.register_hook(grad_hook)

        return forward_hook

    for module, slot in zip(modules, records, strict=True):
        handles.append(module.register_forward_hook(make_hook(slot)))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def compute_pair_gradients(peft_model, encoded: Sequence[EncodedPair], reference_logps: torch.Tensor,
                           beta: float, pad_id: int, mode: str = "hooks") -> torch.Tensor:
    """Per-pair gradients of the DPO loss w.r.t. the LoRA weights, flattened.

    Args:
        peft_model: The LoRA-wrapped model with the checkpoint's weights loaded (eval mode: no dropout).
        encoded: A batch of pairs.
        reference_logps: [b, 2] reference log-probs of these pairs.
        beta: DPO β.
        pad_id: Padding token id.
        mode: ``hooks`` (one batched backward) or ``loop`` (one backward per pair).

    Returns:
        [b, P] float32 gradients, P in :func:`lora_parameters` order.
    """
    device = model_device(peft_model)
    named = lora_parameters(peft_model)
    params = [p for _, p in named]
    if mode == "loop":
        rows = []
        for i, pair in enumerate(encoded):
            policy = pair_logps(peft_model, [pair], pad_id, device)
            loss = compute_dpo_losses(policy, reference_logps[i : i + 1].to(device), beta).sum()
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.detach().float().reshape(-1) for g in grads]))
        return torch.stack(rows)
    if mode != "hooks":
        raise ConfigError(f"GradientConfig field 'per_sample': unknown mode {mode!r}")
    modules = lora_linear_modules(peft_model)
    b = len(encoded)
    with _capture_lora_io(modules) as records:
        policy = pair_logps(peft_model, encoded, pad_id, device)
        loss = compute_dpo_losses(policy, reference_logps.to(device), beta).sum()
        # gradients w.r.t. the LoRA weights come from the hooks; ask autograd only to run the graph
        torch.autograd.grad(loss, params)
    parts = []
    for slot in records:
        x, g = slot["x"].float(), slot["g"].float()  # [2b, T, in], [2b, T, out]
        per_seq = torch.einsum("bto,bti->boi", g, x).reshape(2 * b, -1)  # [2b, out*in]
        parts.append(per_seq[:b] + per_seq[b:])  # chosen row + rejected row of each pair
    return torch.cat(parts, dim=1)


def precondition_adam(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                      beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """LESS's Adam feature: the update direction Adam would take after one more step with gradient ``g``.

        m = β1·m_t + (1−β1)·g,  v = β2·v_t + (1−β2)·g²,  m̂ = m/(1−β1^(t+1)),  v̂ = v/(1−β2^(t+1)),  Γ = m̂/(√v̂+ε)

    Args:
        grads: [n, P] per-pair gradients.
        exp_avg: [P] the checkpoint's first moments m_t.
        exp_avg_sq: [P] the checkpoint's second moments v_t.
        step: The checkpoint's step count t.
        beta1: Adam β1.
        beta2: Adam β2.
        eps: Adam ε.

    Returns:
        [n, P] preconditioned gradients.
    """
    exp_avg = exp_avg.to(grads.device, torch.float32)
    exp_avg_sq = exp_avg_sq.to(grads.device, torch.float32)
    m = beta1 * exp_avg[None, :] + (1.0 - beta1) * grads
    v = beta2 * exp_avg_sq[None, :] + (1.0 - beta2) * grads.square()
    m_hat = m / (1.0 - beta1 ** (step + 1))
    v_hat = v / (1.0 - beta2 ** (step + 1))
    return m_hat / (v_hat.sqrt() + eps)


class RandomProjector:
    """A fixed, seeded Gaussian random projection R [P, D] with entries N(0, 1/D), applied block by block.

    Rows of R are generated about ``block_rows`` at a time (each run of :data:`PROJECTION_SEED_ROWS` rows from a
    generator seeded with (seed, run index)), so a projection needs about ``block_rows × D`` floats of extra
    memory, and the same seed gives the same R, whatever the block size, on the same device type. When R fits in
    ``cache_elements`` it is generated once and kept. When ``dim`` is at least ``n_params`` there is nothing to
    gain: the projection is the identity (``projected`` is False).

    Args:
        n_params: Input dimension P.
        dim: Requested output dimension D (clamped to P).
        seed: Seed of R.
        device: Where R is generated and applied.
        block_rows: Rows of R generated at once.
        cache_elements: Keep R in memory when P·D is at most this.
    """

    def __init__(self, n_params: int, dim: int, seed: int, device: torch.device | str = "cpu",
                 block_rows: int = 65536, cache_elements: int = 1 << 27):
        self.n_params = int(n_params)
        self.dim = min(int(dim), self.n_params)
        self.projected = self.dim < self.n_params
        self.seed = int(seed)
        self.device = torch.device(device)
        self.block_rows = int(block_rows)
        self._cache = None
        if self.projected and self.n_params * self.dim <= cache_elements:
            self._cache = torch.cat([blk for _, blk in self._blocks()], dim=0)

    def _blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first row, rows of R)``; each run of :data:`PROJECTION_SEED_ROWS` rows has its own seed."""
        scale = 1.0 / math.sqrt(self.dim)
        step = max(1, math.ceil(self.block_rows / PROJECTION_SEED_ROWS)) * PROJECTION_SEED_ROWS
        for start in range(0, self.n_params, step):
            parts = []
            for sub in range(start, min(start + step, self.n_params), PROJECTION_SEED_ROWS):
                rows = min(PROJECTION_SEED_ROWS, self.n_params - sub)
                index = sub // PROJECTION_SEED_ROWS
                gen = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + index) % (1 << 63))
                parts.append(torch.randn((rows, self.dim), generator=gen, device=self.device))
            yield start, torch.cat(parts, dim=0) * scale

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows: [n, P] -> [n, D] float32."""
        if x.shape[-1] != self.n_params:
            raise ConfigError(f"projection expects {self.n_params} columns, got {x.shape[-1]}")
        x = x.to(self.device, torch.float32)
        if not self.projected:
            return x
        if self._cache is not None:
            return x @ self._cache
        out = torch.zeros((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        for start, block in self._blocks():
            out += x[:, start : start + block.shape[0]] @ block
        return out


def iter_gradient_features(peft_model, encoded: Sequence[EncodedPair], reference_logps: torch.Tensor,
                           checkpoint: GradientCheckpoint, projector: RandomProjector, config: GradientConfig,
                           pad_id: int, *, precondition: bool, meter: CostMeter | None = None,
                           progress: bool = False, desc: str = "gradients") -> Iterator[tuple[int, torch.Tensor]]:
    """Unit-norm projected gradient features of pairs at one checkpoint, batch by batch (memory stays flat).

    Args:
        peft_model: The LoRA-wrapped M0.
        encoded: Pairs (training pairs, or targets as pairs).
        reference_logps: [n, 2] reference log-probs.
        checkpoint: Warm-up checkpoint whose LoRA weights (and, if ``precondition``, moments) are used.
        projector: The fixed random projection.
        config: DPO β, Adam settings, batch size, per-sample mode.
        pad_id: Padding token id.
        precondition: Adam-precondition (training pairs) or not (targets: plain gradients).
        meter: Counts forward/backward passes, tokens and projection FLOPs.
        progress: Show a progress bar.
        desc: Progress-bar label.

    Yields:
        ``(start, units [b, D])``: float32 unit rows on the CPU for pairs ``start..start+b``; NaN rows for
        degenerate pairs (chosen == rejected).
    """
    load_checkpoint_weights(peft_model, checkpoint)
    peft_model.eval()
    for start, batch in tqdm(list(batches(encoded, config.grad_batch_size)), desc=desc, disable=not progress,
                             unit="batch"):
        grads = compute_pair_gradients(peft_model, batch, reference_logps[start : start + len(batch)], config.beta,
                                       pad_id, config.per_sample)  # [b, P]
        if meter is not None:
            tokens = sum(p.n_tokens for p in batch)
            meter.add_forward(tokens, passes=2 * len(batch))
            meter.add_backward(tokens, passes=2 * len(batch))
            if projector.projected:
                meter.add_flops(2.0 * projector.n_params * projector.dim * len(batch))
        if precondition:
            grads = precondition_adam(grads, checkpoint.exp_avg, checkpoint.exp_avg_sq, checkpoint.step,
                                      config.adam_beta1, config.adam_beta2, config.adam_eps)
        units, _ = unit_rows(projector.project(grads))  # [b, D]
        units = units.cpu()
        units[torch.tensor([p.degenerate for p in batch], dtype=torch.bool)] = float("nan")
        yield start, units


def compute_gradient_features(peft_model, encoded: Sequence[EncodedPair], reference_logps: torch.Tensor,
                              checkpoint: GradientCheckpoint, projector: RandomProjector, config: GradientConfig,
                              pad_id: int, *, precondition: bool, meter: CostMeter | None = None,
                              progress: bool = False, desc: str = "gradients") -> torch.Tensor:
    """All features of :func:`iter_gradient_features` in one [n, D] tensor (for targets and small sets)."""
    out = torch.full((len(encoded), projector.dim), float("nan"), dtype=torch.float32)
    for start, units in iter_gradient_features(peft_model, encoded, reference_logps, checkpoint, projector, config,
                                               pad_id, precondition=precondition, meter=meter, progress=progress,
                                               desc=desc):
        out[start : start + len(units)] = units
    return out


def mean_target_cosine(train_units: torch.Tensor, target_units: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each training feature with the targets that have a direction.

    Args:
        train_units: [n, D] unit rows (NaN rows have no score).
        target_units: [m, D] unit rows (NaN rows are left out of the mean).

    Returns:
        [n] float64 mean cosines, NaN where the training row is NaN.
    """
    ok_targets = ~torch.isnan(target_units).any(dim=1)
    if not bool(ok_targets.any()):
        raise DataError("every target has r1 identical to r0 (or no response tokens): no gradient direction")
    targets = target_units[ok_targets].double()
    sims = torch.nan_to_num(train_units.double(), nan=0.0) @ targets.T  # [n, m']
    scores = sims.mean(dim=1)
    scores[torch.isnan(train_units).any(dim=1)] = float("nan")
    return scores
