"""Gradient attribution baseline: LESS (Xia et al. 2024) adapted to DPO, as in arXiv 2602.11079.

Steps (``n`` training pairs, ``m`` targets, ``P`` LoRA parameters, ``D`` projection dimension):

1. **Warm-up.** Attach a LoRA adapter to M0 and train it with the DPO (sigmoid) loss on a seeded random
   ``warmup_fraction`` of the pairs for ``warmup_epochs`` epochs (AdamW, linear schedule). The reference model
   is M0 itself: the same network with the adapter disabled. At the end of every epoch a checkpoint keeps the
   LoRA weights and AdamW's moment estimates (``exp_avg``, ``exp_avg_sq``).
2. **Gradient features, per checkpoint.** Per-pair gradients of the DPO loss w.r.t. the LoRA weights:

       training pair   Γ(z)  = m̂ / (√v̂ + ε)      the Adam update direction, with the checkpoint's moments
                                                  updated by this pair's gradient g (bias-corrected)
       target triple   ∇ℓ(t)                     the plain gradient of the DPO loss with chosen = r1,
                                                  rejected = r0

   Both [·, P] are mapped to [·, D] by one fixed, seeded Gaussian projection (generated block by block, so
   memory stays bounded) and L2-normalised.
3. **Score.** cos(Γ(z), ∇ℓ(t)) averaged over targets, then averaged over checkpoints weighted by each
   checkpoint's mean learning rate during its epoch (LESS's η̄ᵢ weighting, normalised to sum 1).

Per-pair gradients come from one batched backward pass: hooks on every LoRA ``Linear`` record its input and the
gradient of its output per sequence, and the per-sequence weight gradient is ``Σ_t g_t ⊗ x_t``; a pair's gradient
is the sum over its chosen and rejected sequences. This is exact (every sequence's loss term depends only on its
own row) and is checked against a loop of single-pair backwards (``per_sample="loop"``).

A pair whose chosen and rejected token sequences are identical (after truncation) has no gradient direction: its
score is NaN, it is counted in the metadata and it ranks last.

Modules: :mod:`pairtrace.baselines.lora_warmup` (step 1), :mod:`pairtrace.baselines.gradient_features` (step 2);
this one holds the settings and the ranking (step 3).
"""


from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pairtrace import __version__
from pairtrace.attribute import Ranking, build_ranking, pair_metadata_frame
from pairtrace.baselines.gradient_features import (
    RandomProjector,
    compute_gradient_features,
    iter_gradient_features,
    mean_target_cosine,
)
from pairtrace.baselines.lora_warmup import (
    attach_lora,
    compute_reference_logps,
    detach_lora,
    encode_pairs,
    encode_targets,
    lora_parameters,
    model_device,
    save_checkpoints,
    warm_up_lora,
)
from pairtrace.cost import CostMeter, count_parameters
from pairtrace.data.types import PairSet
from pairtrace.errors import ConfigError, DataError
from pairtrace.models import LoadedModel, load_model, pad_token_id

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
"""LoRA on the attention query and value projections (Llama/OLMo 2/Mistral/Qwen naming), as in LESS."""
PER_SAMPLE_MODES = ("hooks", "loop")


@dataclass
class GradientConfig:
    """Arguments of :func:`compute_gradient_ranking` (saved in the ranking's metadata)."""

    warmup_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of the pairs (seeded random) used for the LoRA warm-up."}
    )
    warmup_epochs: int = field(default=2, metadata={"help": "Warm-up epochs; one checkpoint at the end of each."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout during the warm-up (LESS: 0.1)."})
    lora_targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names that get a LoRA adapter; default q_proj, v_proj (attention query/value "
                  "of Llama-style models; GPT-2 would need c_attn)."},
    )
    lr: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate of the warm-up."})
    lr_warmup_ratio: float = field(
        default=0.03, metadata={"help": "Fraction of warm-up steps with a linear learning-rate ramp; then linear "
                                "decay to 0."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (also used to precondition)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (also used to precondition)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon (also used to precondition)."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    projection_dim: int = field(
        default=8192, metadata={"help": "Random projection dimension (clamped to the number of LoRA parameters; "
                                "at or above it no projection is applied)."}
    )
    projection_block: int = field(
        default=65536, metadata={"help": "Rows of the projection matrix generated at once (bounds memory)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the warm-up subset, LoRA init, shuffling, projection."})
    max_length: int = field(default=1024, metadata={"help": "Maximum tokens per prompt + response sequence."})
    batch_size: int = field(default=4, metadata={"help": "Pairs per optimiser step in the warm-up."})
    grad_batch_size: int = field(default=8, metadata={"help": "Pairs per batched per-pair-gradient pass."})
    per_sample: str = field(
        default="hooks", metadata={"help": "Per-pair gradients: hooks (one batched backward) or loop (one "
                                   "backward per pair; slower, used as the reference in tests)."}
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "If set, write each warm-up checkpoint (LoRA weights + Adam moments) here "
                                "as safetensors."}
    )

    def __post_init__(self) -> None:
        checks = {
            "warmup_fraction": 0.0 < self.warmup_fraction <= 1.0,
            "warmup_epochs": self.warmup_epochs >= 1,
            "lora_r": self.lora_r >= 1,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "lora_targets": bool(self.lora_targets),
            "lr": self.lr > 0,
            "lr_warmup_ratio": 0.0 <= self.lr_warmup_ratio < 1.0,
            "beta": self.beta > 0,
            "projection_dim": self.projection_dim >= 1,
            "projection_block": self.projection_block >= 1,
            "max_length": self.max_length >= 2,
            "batch_size": self.batch_size >= 1,
            "grad_batch_size": self.grad_batch_size >= 1,
            "per_sample": self.per_sample in PER_SAMPLE_MODES,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            name = bad[0]
            raise ConfigError(f"GradientConfig field '{name}': invalid value {getattr(self, name)!r}")
        self.lora_targets = list(self.lora_targets)


def _as_loaded(m0: LoadedModel | str | Path) -> LoadedModel:
    if isinstance(m0, str | Path):
        return load_model(m0)
    if not hasattr(m0, "model") or not hasattr(m0, "tokenizer"):
        raise ConfigError(f"m0 must be a model path or a LoadedModel, got {type(m0).__name__}")
    return m0


def select_warmup_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of ``range(n)`` (at least one index), sorted."""
    k = min(n, max(1, round(fraction * n)))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def compute_gradient_ranking(m0: LoadedModel | str | Path, pairs: PairSet, targets: Sequence[Any],
                             config: GradientConfig | None = None, *, progress: bool = True,
                             cost: CostMeter | None = None) -> Ranking:
    """Rank pairs by the LESS-for-DPO gradient baseline (see the module docstring).

    The model is left as it was found: the LoRA layers are removed (not merged) and the original
    ``requires_grad`` flags and train/eval mode are restored, even on error.

    Args:
        m0: The initial checkpoint: a path (loaded with :func:`pairtrace.models.load_model`, not timed) or a
            :class:`~pairtrace.models.LoadedModel`.
        pairs: The preference pairs to rank.
        targets: Behaviour triples (``prompt``, ``r1``, ``r0``, ``prompt_id``), used as target pairs.
        config: Warm-up, LoRA, projection and batching settings.
        progress: Show progress bars.
        cost: Meter to count into (a new one named ``gradient`` otherwise); its record is also stored in the
            ranking's metadata under ``cost``.

    Returns:
        The ranking, best-first; metadata holds the config, checkpoints (epoch, step, lr, weight), warm-up ids,
        LoRA parameter count, effective projection dimension, counts of degenerate pairs and the cost.

    Raises:
        DataError: No pairs, no targets, or every target degenerate.
        ConfigError: Invalid settings or no module matching ``lora_targets``.
    """
    config = config or GradientConfig()
    if len(pairs) == 0:
        raise DataError("the pair set is empty: nothing to rank")
    if len(targets) == 0:
        raise DataError("no target triples: the gradient baseline needs at least one (prompt, r1, r0)")
    loaded = _as_loaded(m0)
    model = loaded.model
    meter = cost if cost is not None else CostMeter("gradient")
    pad_id = pad_token_id(loaded.tokenizer)
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    with meter.measure():
        encoded = encode_pairs(loaded, [p.prompt for p in pairs], [p.chosen for p in pairs],
                               [p.rejected for p in pairs], config.max_length)
        encoded_targets = encode_targets(loaded, targets, config.max_length)
        warm_idx = select_warmup_indices(len(pairs), config.warmup_fraction, config.seed)
        base_params = count_parameters(model)
        peft_model = attach_lora(model, config)
        try:
            n_lora = sum(p.numel() for _, p in lora_parameters(peft_model))
            meter.params_forward = meter.params_backward = base_params + n_lora
            meter.add_note("forward = 2·N·tokens, backward = 4·N·tokens, N = all blocks + head + LoRA; "
                           "projection = 2·P·D per gradient")
            ref_pairs = compute_reference_logps(peft_model, encoded, pad_id, config.grad_batch_size, meter=meter,
                                                progress=progress, desc="reference log-probs (pairs)")
            ref_targets = compute_reference_logps(peft_model, encoded_targets, pad_id, config.grad_batch_size,
                                                  meter=meter, progress=progress,
                                                  desc="reference log-probs (targets)")
            checkpoints = warm_up_lora(peft_model, [encoded[i] for i in warm_idx], ref_pairs[warm_idx], config,
                                       pad_id, meter=meter, progress=progress)
            if config.checkpoint_dir:
                save_checkpoints(checkpoints, config.checkpoint_dir)
            projector = RandomProjector(n_lora, config.projection_dim, config.seed, model_device(peft_model),
                                        block_rows=config.projection_block)
            weights = np.array([c.lr for c in checkpoints], dtype=np.float64)
            weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1.0 / len(weights))
            scores = np.zeros(len(pairs), dtype=np.float64)
            for ckpt, weight in zip(checkpoints, weights, strict=True):
                target_units = compute_gradient_features(
                    peft_model, encoded_targets, ref_targets, ckpt, projector, config, pad_id, precondition=False,
                    meter=meter, progress=progress, desc=f"target gradients (epoch {ckpt.epoch})")
                for start, units in iter_gradient_features(
                        peft_model, encoded, ref_pairs, ckpt, projector, config, pad_id, precondition=True,
                        meter=meter, progress=progress, desc=f"pair gradients (epoch {ckpt.epoch})"):
                    scores[start : start + len(units)] += weight * mean_target_cosine(units, target_units).numpy()
        finally:
            restored = detach_lora(peft_model)
            for name, p in restored.named_parameters():
                p.requires_grad_(saved_flags.get(name, p.requires_grad))
            restored.train(was_training)
        degenerate = [p.degenerate for p in encoded]
        scores[np.asarray(degenerate, dtype=bool)] = np.nan
        metadata = {
            "kind": "ranking",
            "method": "gradient",
            "config": asdict(config),
            "model": dict(getattr(loaded, "identity", {}) or {}),
            "dataset": {"fingerprint": getattr(pairs, "fingerprint", ""), "origin": getattr(pairs, "origin", ""),
                        "n_pairs": len(pairs)},
            "n_targets": len(targets),
            "n_degenerate_targets": int(sum(t.degenerate for t in encoded_targets)),
            "n_degenerate": int(sum(degenerate)),
            "n_truncated": int(sum(p.chosen.truncated or p.rejected.truncated for p in encoded)),
            "n_lora_params": int(n_lora),
            "projection_dim": int(projector.dim),
            "projected": bool(projector.projected),
            "warmup_ids": [pairs[i].id for i in warm_idx],
            "checkpoints": [{"epoch": c.epoch, "step": c.step, "lr": c.lr, "weight": float(w)}
                            for c, w in zip(checkpoints, weights, strict=True)],
            "pairtrace_version": __version__,
        }
        ranking = build_ranking([p.id for p in pairs], scores, metadata, pair_metadata=pair_metadata_frame(pairs))
    ranking.metadata["cost"] = meter.record().to_dict()
    if ranking.metadata["n_nan"]:
        logger.warning("%d of %d pairs have identical chosen and rejected tokens: no gradient score, ranked last",
                       ranking.metadata["n_nan"], len(ranking))
    return ranking
