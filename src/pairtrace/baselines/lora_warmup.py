"""The LoRA side of the gradient baseline: pairs encoded for DPO, sequence log-probs and the DPO loss, a LoRA adapter
on M0 (whose disabled adapter is the reference model), the warm-up that trains it, and its checkpoints (LoRA weights
with AdamW's moments)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pairtrace.cost import CostMeter
from pairtrace.data.types import Message
from pairtrace.errors import ConfigError, DataError
from pairtrace.models import LoadedModel, TeacherForced, build_teacher_forcing
from pairtrace.records import atomic_path

if TYPE_CHECKING:
    from pairtrace.baselines.gradient import GradientConfig

_ADAPTER = "default"

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


def pair_logps(model: nn.Module, pairs: Sequence[EncodedPair], pad_id: int, device: torch.device) -> torch.Tensor:
    """[b, 2] summed response log-probs (chosen, rejected) of a batch of pairs."""
    logps = compute_sequence_logps(model, _pair_batch(pairs, pad_id, device))  # [2b]
    return torch.stack([logps[: len(pairs)], logps[len(pairs) :]], dim=1)


def batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def model_device(model: nn.Module) -> torch.device:
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
    device = model_device(model)
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


def lora_linear_modules(peft_model) -> list[nn.Linear]:
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


def compute_pair_logps(model: nn.Module, encoded: Sequence[EncodedPair], pad_id: int, batch_size: int, *,
                       meter: CostMeter | None = None, progress: bool = False,
                       desc: str = "pair log-probs") -> torch.Tensor:
    """Summed response log-probs of every pair under ``model`` as it is (no grad, batches of ``batch_size``).

    Returns:
        [n, 2] float32 (chosen, rejected) log-probs on the CPU.
    """
    device = model_device(model)
    out = torch.zeros((len(encoded), 2), dtype=torch.float32)
    with torch.no_grad():
        for start, batch in tqdm(list(batches(encoded, batch_size)), desc=desc, disable=not progress, unit="batch"):
            out[start : start + len(batch)] = pair_logps(model, batch, pad_id, device).cpu()
            if meter is not None:
                meter.add_forward(sum(p.n_tokens for p in batch), passes=2 * len(batch))
    return out


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
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            return compute_pair_logps(peft_model, encoded, pad_id, batch_size, meter=meter, progress=progress,
                                      desc=desc)
    finally:
        peft_model.train(was_training)


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
    device = model_device(peft_model)
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
                policy = pair_logps(peft_model, batch, pad_id, device)
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
