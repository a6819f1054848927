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
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pairtrace import __version__
from pairtrace.attribute import Ranking, build_ranking, pair_metadata_frame, unit_rows
from pairtrace.cost import CostMeter, count_parameters
from pairtrace.data.types import Message, PairSet
from pairtrace.errors import ConfigError, DataError
from pairtrace.models import LoadedModel, TeacherForced, build_teacher_forcing, load_model, pad_token_id
from pairtrace.records import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
"""LoRA on the attention query and value projections (Llama/OLMo 2/Mistral/Qwen naming), as in LESS."""
PER_SAMPLE_MODES = ("hooks", "loop")
PROJECTION_SEED_ROWS = 1024
"""Rows of the projection matrix drawn from one seeded generator: R does not depend on the block size."""
_ADAPTER = "default"


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


@dataclass(frozen=True)
class EncodedPair:
    """Teacher-forced token ids of one preference pair (or one target triple: chosen = r1, rejected = r0)."""

    chosen: TeacherForced
    rejected: TeacherForced

    @property
    def degenerate(self) -> bool:
        """Whether chosen and rejected are the same token sequence (no gradient direction)."""
        return self.chosen.input_ids == self.rejected.input_ids

    @property
    def n_tokens(self) -> int:
        """Tokens of both sequences."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class GradientCheckpoint:
    """LoRA weights and AdamW moments at the end of one warm-up epoch.

    Attributes:
        epoch: 1-based epoch.
        step: Optimiser steps taken so far (Adam's ``t``).
        lr: Mean learning rate over the epoch's steps (the checkpoint's weight in the score).
        lora: LoRA weights by parameter name.
        exp_avg: [P] first moments, flattened in :func:`lora_parameters` order.
        exp_avg_sq: [P] second moments, same order.
    """

    epoch: int
    step: int
    lr: float
    lora: dict[str, torch.Tensor]
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


def encode_pairs(loaded: LoadedModel, prompts: Sequence[Sequence[Message]], chosen: Sequence[str],
                 rejected: Sequence[str], max_length: int) -> list[EncodedPair]:
    """Teacher-force every (prompt, chosen) and (prompt, rejected) with the model's own formatting.

    Args:
        loaded: The model (tokenizer and template mode).
        prompts: Prompt turns, one per pair.
        chosen: Chosen responses.
        rejected: Rejected responses.
        max_length: Maximum tokens per sequence.

    Returns:
        One :class:`EncodedPair` per input.
    """
    tf_chosen = build_teacher_forcing(loaded, list(prompts), list(chosen), max_length)
    tf_rejected = build_teacher_forcing(loaded, list(prompts), list(rejected), max_length)
    return [EncodedPair(c, r) for c, r in zip(tf_chosen, tf_rejected, strict=True)]


def encode_targets(loaded: LoadedModel, targets: Sequence[Any], max_length: int) -> list[EncodedPair]:
    """Teacher-force behaviour triples as preference pairs: chosen = r1 (shows the behaviour), rejected = r0."""
    return encode_pairs(loaded, [t.prompt for t in targets], [t.r1 for t in targets], [t.r0 for t in targets],
                        max_length)


def collate_sequences(seqs: Sequence[TeacherForced], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad sequences into a batch.

    Returns:
        ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``target_mask`` [B, T-1] marking the logit positions
        that predict a response token (position t predicts token t+1).
    """
    length = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    target = torch.zeros((len(seqs), max(length - 1, 0)), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        attn[i, : len(s.input_ids)] = 1
        start = max(s.response_start, 1)  # a first token with no prefix cannot be predicted
        if s.response_end > start:
            target[i, start - 1 : s.response_end - 1] = True
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "target_mask": target.to(device)}


def compute_sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probabilities of the response tokens of each sequence, in float32.

    Args:
        model: A causal LM (possibly a peft model).
        batch: Output of :func:`collate_sequences`.

    Returns:
        [B] summed response log-probabilities.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    logits = logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    token_logps = torch.gather(logits, 2, labels[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)  # [B, T-1]
    return (token_logps * batch["target_mask"]).sum(dim=1)


def compute_dpo_losses(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO sigmoid loss ``-log σ(β((π_c − π_r) − (ref_c − ref_r)))``.

    Args:
        policy_logps: [n, 2] summed log-probs (chosen, rejected) under the policy.
        reference_logps: [n, 2] the same under the reference.
        beta: DPO β.

    Returns:
        [n] losses.
    """
    margin = (policy_logps[:, 0] - policy_logps[:, 1]) - (reference_logps[:, 0] - reference_logps[:, 1])
    return -F.logsigmoid(beta * margin)


def _pair_batch(pairs: Sequence[EncodedPair], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Sequences of a batch of pairs, chosen rows first then rejected rows: [c_0..c_{b-1}, r_0..r_{b-1}]."""
    return collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


def _pair_logps(model: nn.Module, pairs: Sequence[EncodedPair], pad_id: int, device: torch.device) -> torch.Tensor:
    """[b, 2] summed response log-probs (chosen, rejected) of a batch of pairs."""
    logps = compute_sequence_logps(model, _pair_batch(pairs, pad_id, device))  # [2b]
    return torch.stack([logps[: len(pairs)], logps[len(pairs) :]], dim=1)


def _batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def attach_lora(model: nn.Module, config: GradientConfig):
    """Wrap ``model`` in a peft LoRA model (in place), with a seeded initialisation.

    Args:
        model: The base causal LM (M0).
        config: LoRA rank, alpha, dropout, targets and seed.

    Returns:
        The ``PeftModel``; undo with :func:`detach_lora`.

    Raises:
        ConfigError: No module of the model matches ``lora_targets``.
    """
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not present.intersection(config.lora_targets):
        raise ConfigError(
            f"GradientConfig field 'lora_targets': none of {config.lora_targets} is a module of "
            f"{type(model).__name__} (e.g. Llama/OLMo use q_proj, v_proj; GPT-2 uses c_attn)"
        )
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    device = _model_device(model)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing through a name deprecated in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora_config)


def detach_lora(peft_model) -> nn.Module:
    """Remove the LoRA layers without merging them, giving back the original base model."""
    return peft_model.unload()


def lora_parameters(peft_model) -> list[tuple[str, nn.Parameter]]:
    """The trainable LoRA parameters in a fixed order (the order of every flattened gradient)."""
    return [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]


def _lora_linear_modules(peft_model) -> list[nn.Linear]:
    """The ``nn.Linear`` module owning each LoRA parameter, in :func:`lora_parameters` order."""
    owner = {}
    for module in peft_model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            if module.bias is not None and module.bias.requires_grad:
                raise ConfigError("LoRA layers with trainable biases are not supported by the gradient baseline")
            owner[id(module.weight)] = module
    modules = []
    for name, param in lora_parameters(peft_model):
        if id(param) not in owner:
            raise ConfigError(f"trainable parameter {name} does not belong to a Linear layer")
        modules.append(owner[id(param)])
    return modules


def compute_reference_logps(peft_model, encoded: Sequence[EncodedPair], pad_id: int, batch_size: int, *,
                            meter: CostMeter | None = None, progress: bool = False,
                            desc: str = "reference log-probs") -> torch.Tensor:
    """Summed response log-probs of every pair under the reference: the same model with the adapter disabled.

    Args:
        peft_model: The LoRA-wrapped M0.
        encoded: Pairs to score.
        pad_id: Padding token id.
        batch_size: Pairs per forward batch.
        meter: Counts forward passes and tokens.
        progress: Show a progress bar.
        desc: Progress-bar label.

    Returns:
        [n, 2] float32 (chosen, rejected) log-probs on the CPU.
    """
    device = _model_device(peft_model)
    out = torch.zeros((len(encoded), 2), dtype=torch.float32)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            for start, batch in tqdm(list(_batches(encoded, batch_size)), desc=desc, disable=not progress,
                                     unit="batch"):
                out[start : start + len(batch)] = _pair_logps(peft_model, batch, pad_id, device).cpu()
                if meter is not None:
                    meter.add_forward(sum(p.n_tokens for p in batch), passes=2 * len(batch))
    finally:
        peft_model.train(was_training)
    return out


def _linear_schedule(total_steps: int, warmup_ratio: float):
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        remaining = max(1, total_steps - warmup)
        return max(0.0, (total_steps - step) / remaining)

    return factor


def _flatten_state(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], key: str) -> torch.Tensor:
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        value = state.get(key)
        parts.append(torch.zeros(p.numel(), dtype=torch.float32) if value is None
                     else value.detach().float().reshape(-1).cpu())
    return torch.cat(parts)


def _set_warmup_mode(peft_model) -> None:
    """Eval mode everywhere (no model dropout, as TRL's DPO trainer does by default) except LoRA's own dropout."""
    peft_model.eval()
    for name, module in peft_model.named_modules():
        if name.rsplit(".", 1)[-1] == "lora_dropout" or ".lora_dropout." in f".{name}.":
            module.train()


def warm_up_lora(peft_model, encoded: Sequence[EncodedPair], reference_logps: torch.Tensor, config: GradientConfig,
                 pad_id: int, *, meter: CostMeter | None = None, progress: bool = False) -> list[GradientCheckpoint]:
    """Train the LoRA adapter with the DPO loss and keep a checkpoint at the end of every epoch.

    The model's own dropout stays off during the warm-up (as in TRL's DPO trainer); only ``lora_dropout`` applies.

    Args:
        peft_model: The LoRA-wrapped M0 (updated in place).
        encoded: The warm-up pairs.
        reference_logps: [len(encoded), 2] reference log-probs (adapter disabled).
        config: Epochs, batch size, learning rate and schedule, AdamW settings, DPO β, seed.
        pad_id: Padding token id.
        meter: Counts forward/backward passes and tokens.
        progress: Show a progress bar.

    Returns:
        One :class:`GradientCheckpoint` per epoch.
    """
    device = _model_device(peft_model)
    named = lora_parameters(peft_model)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    schedule = _linear_schedule(steps_per_epoch * config.warmup_epochs, config.lr_warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoints = []
    step = 0
    _set_warmup_mode(peft_model)
    bar = tqdm(total=steps_per_epoch * config.warmup_epochs, desc="LoRA warm-up (DPO)", disable=not progress,
               unit="step")
    try:
        for epoch in range(1, config.warmup_epochs + 1):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            lrs = []
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                batch = [encoded[i] for i in idx]
                lrs.append(scheduler.get_last_lr()[0])
                policy = _pair_logps(peft_model, batch, pad_id, device)
                loss = compute_dpo_losses(policy, reference_logps[idx].to(device), config.beta).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if meter is not None:
                    tokens = sum(p.n_tokens for p in batch)
                    meter.add_forward(tokens, passes=2 * len(batch))
                    meter.add_backward(tokens, passes=2 * len(batch))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            checkpoints.append(GradientCheckpoint(
                epoch=epoch,
                step=step,
                lr=float(np.mean(lrs)),
                lora={name: p.detach().clone() for name, p in named},
                exp_avg=_flatten_state(optimizer, params, "exp_avg"),
                exp_avg_sq=_flatten_state(optimizer, params, "exp_avg_sq"),
            ))
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        peft_model.eval()
    return checkpoints


def load_checkpoint_weights(peft_model, checkpoint: GradientCheckpoint) -> None:
    """Copy a checkpoint's LoRA weights into the adapter."""
    with torch.no_grad():
        for name, p in lora_parameters(peft_model):
            if name not in checkpoint.lora:
                raise ConfigError(f"checkpoint of epoch {checkpoint.epoch} has no weights for {name}")
            p.copy_(checkpoint.lora[name].to(p.device, p.dtype))


def save_checkpoints(checkpoints: Sequence[GradientCheckpoint], directory: str | Path) -> list[Path]:
    """Write each checkpoint as ``epoch_{i}.safetensors`` (LoRA weights, moments; epoch/step/lr as metadata)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ckpt in checkpoints:
        tensors = {f"lora.{name}": t.detach().cpu().contiguous() for name, t in ckpt.lora.items()}
        tensors["exp_avg"] = ckpt.exp_avg.contiguous()
        tensors["exp_avg_sq"] = ckpt.exp_avg_sq.contiguous()
        path = directory / f"epoch_{ckpt.epoch}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"epoch": str(ckpt.epoch), "step": str(ckpt.step),
                                                   "lr": repr(ckpt.lr)})
        paths.append(path)
    return paths


def load_checkpoints(directory: str | Path) -> list[GradientCheckpoint]:
    """Read checkpoints written by :func:`save_checkpoints`, in epoch order."""
    from safetensors import safe_open

    directory = Path(directory)
    paths = sorted(directory.glob("epoch_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if not paths:
        raise DataError(f"no gradient checkpoints (epoch_*.safetensors) in {directory}")
    checkpoints = []
    for path in paths:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            missing = [k for k in ("epoch", "step", "lr") if k not in meta]
            if missing:
                raise DataError(f"{path}: metadata field '{missing[0]}' missing")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in tensors:
                raise DataError(f"{path}: tensor '{key}' missing")
        checkpoints.append(GradientCheckpoint(
            epoch=int(meta["epoch"]), step=int(meta["step"]), lr=float(meta["lr"]),
            lora={k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")},
            exp_avg=tensors["exp_avg"], exp_avg_sq=tensors["exp_avg_sq"],
        ))
    return checkpoints


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
    device = _model_device(peft_model)
    named = lora_parameters(peft_model)
    params = [p for _, p in named]
    if mode == "loop":
        rows = []
        for i, pair in enumerate(encoded):
            policy = _pair_logps(peft_model, [pair], pad_id, device)
            loss = compute_dpo_losses(policy, reference_logps[i : i + 1].to(device), beta).sum()
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.detach().float().reshape(-1) for g in grads]))
        return torch.stack(rows)
    if mode != "hooks":
        raise ConfigError(f"GradientConfig field 'per_sample': unknown mode {mode!r}")
    modules = _lora_linear_modules(peft_model)
    b = len(encoded)
    with _capture_lora_io(modules) as records:
        policy = _pair_logps(peft_model, encoded, pad_id, device)
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
    for start, batch in tqdm(list(_batches(encoded, config.grad_batch_size)), desc=desc, disable=not progress,
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
            projector = RandomProjector(n_lora, config.projection_dim, config.seed, _model_device(peft_model),
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
