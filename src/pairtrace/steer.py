"""Steering check: add a behaviour vector to M0's residual stream while it generates, and measure the behaviour.

A cheap causal test that needs no retraining: if the behaviour vector v_b found by attribution really encodes the
behaviour, pushing M0 along it should make M0 show the behaviour (DESIGN.md §2.9). The added vector is

    Δ = α · v_b / ‖v_b‖ · n̄_k          (n̄_k = mean residual-stream norm at layer k, measured on a few prompts)

so α is measured in units of a typical activation's size and comparable across layers and models.

Where it is added: layer k is ``hidden_states[k]`` as in extraction, i.e. the OUTPUT of decoder block k−1
(k = 0: the input of block 0, the embedding output; k = n_layers: the output of the final norm). The hook is
placed first among the block's forward hooks, so Hugging Face's own ``output_hidden_states`` sees the steered
stream (the tests check ``hidden_states[k]`` = unsteered + Δ on steered positions).

When it is added: only on generated positions, never on the prompt. A pre-hook on the model reads how many
tokens the KV cache already holds; the prefill call (empty cache) fixes the (padded) prompt length P, and
positions ≥ P are steered. With ``include_last_prompt_token`` position P−1, whose output predicts the first
response token, is steered too. Without a KV cache every call looks like a prefill: pass ``prompt_length``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pairtrace import __version__
from pairtrace.errors import ConfigError, DataError
from pairtrace.judges.base import Judge
from pairtrace.models import (
    LoadedModel,
    ModelSpec,
    as_loaded_model,
    build_teacher_forcing,
    get_decoder_layers,
    get_final_norm,
    resolve_layers,
)
from pairtrace.records import write_jsonl_atomic, write_text_atomic
from pairtrace.stats import bootstrap_rate_ci

logger = logging.getLogger(__name__)

DEFAULT_NORM_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain how photosynthesis works in simple terms.",
    "Give me three ideas for a birthday party.",
    "What is the capital of France?",
)
"""Neutral prompts on which the mean residual norm is measured when no prompts are given."""


@dataclass
class SteeringHandle:
    """What a :func:`steering` context adds, for logging and tests.

    Attributes:
        layer: Layer k (``hidden_states[k]``).
        alpha: Strength in units of the mean residual norm.
        norm: Mean residual norm n̄_k used for scaling.
        delta: The vector Δ added at each steered position, ``[d]`` float32.
        prompt_length: Prompt length of the current generation (set by the prefill call or given).
        calls: Model calls seen inside the context.
    """

    layer: int
    alpha: float
    norm: float
    delta: torch.Tensor
    prompt_length: int | None = None
    calls: int = 0


def measure_residual_norm(loaded: LoadedModel, prompts: Sequence[str], layer: int, max_length: int = 512) -> float:
    """Mean L2 norm of layer-k residual vectors over the tokens of a few formatted prompts.

    The first token of each sequence is left out: models often give it a far larger norm (an attention sink),
    which would inflate the scale.

    Args:
        loaded: The model.
        prompts: Prompts (a string is one user turn), formatted like at generation time.
        layer: Layer k.
        max_length: Tokens kept per prompt.

    Returns:
        The mean norm (float).
    """
    (layer,) = resolve_layers(layer, loaded.n_layers)
    if not prompts:
        raise ConfigError("measure_residual_norm needs at least one prompt")
    items = build_teacher_forcing(loaded, list(prompts), [""] * len(prompts), max_length)
    total, count = 0.0, 0
    with torch.inference_mode():
        for item in items:
            ids = torch.tensor([item.input_ids], device=loaded.device)  # [1, T]
            hidden = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
            norms = torch.linalg.vector_norm(hidden[0, 1:].float(), dim=-1)  # [T-1]
            if norms.numel() == 0:
                norms = torch.linalg.vector_norm(hidden[0].float(), dim=-1)
            total += float(norms.sum())
            count += int(norms.numel())
    return total / max(count, 1)


def _unit(vector: torch.Tensor, hidden_size: int) -> torch.Tensor:
    vector = torch.as_tensor(vector).detach().to(torch.float32).reshape(-1)  # [d]
    if vector.numel() != hidden_size:
        raise ConfigError(f"steering vector has {vector.numel()} entries but the model's hidden size is {hidden_size}")
    norm = float(torch.linalg.vector_norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise ConfigError("steering vector is zero or non-finite: it has no direction")
    return vector / norm


def _cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of a model call (0 for a prefill or a call without cache)."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


def _input_length(args: tuple, kwargs: dict[str, Any]) -> int:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor):
            return int(value.shape[1])
    raise ConfigError("steering could not find input_ids or inputs_embeds in the model call")


@contextlib.contextmanager
def steering(loaded: LoadedModel, vector: torch.Tensor, layer: int, alpha: float, *, norm: float | None = None,
             norm_prompts: Sequence[str] | None = None, prompt_length: int | None = None,
             include_last_prompt_token: bool = False) -> Iterator[SteeringHandle]:
    """Add α · (unit v) · n̄_k to layer k of the residual stream on generated positions, inside the context.

    Args:
        loaded: The model (M0).
        vector: Steering direction ``[d]`` (e.g. the probe at layer k); only its direction is used.
        layer: Layer k = ``hidden_states[k]`` (output of decoder block k−1; 0 = embedding output).
        alpha: Strength in units of the mean residual norm (0 is a no-op).
        norm: Mean residual norm n̄_k; measured with :func:`measure_residual_norm` when ``None``.
        norm_prompts: Prompts for that measurement (default: :data:`DEFAULT_NORM_PROMPTS`).
        prompt_length: Fix the prompt length instead of reading it from the prefill call (for calls without
            a KV cache, e.g. one teacher-forced forward over prompt + response).
        include_last_prompt_token: Also steer the last prompt position (it predicts the first response token).

    Yields:
        A :class:`SteeringHandle` describing the added vector.
    """
    (layer,) = resolve_layers(layer, loaded.n_layers)
    direction = _unit(vector, loaded.hidden_size)
    if norm is None:
        norm = measure_residual_norm(loaded, list(norm_prompts or DEFAULT_NORM_PROMPTS), layer)
    handle = SteeringHandle(layer=layer, alpha=float(alpha), norm=float(norm),
                            delta=direction * float(alpha) * float(norm), prompt_length=prompt_length)
    state: dict[str, torch.Tensor | None] = {"mask": None}
    offset = 1 if include_last_prompt_token else 0

    def before_model(module, args, kwargs):
        past, length = _cache_length(kwargs), _input_length(args, kwargs)
        if prompt_length is None and past == 0:
            handle.prompt_length = length  # the prefill: everything in this call is prompt
        start = (handle.prompt_length or 0) - offset
        state["mask"] = torch.arange(past, past + length) >= start  # [T] bool, True = steered
        handle.calls += 1

    def add(hidden: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        if mask is None or not bool(mask.any()):
            return hidden
        delta = handle.delta.to(device=hidden.device, dtype=hidden.dtype)
        mask = mask.to(hidden.device)[None, :, None]  # [1, T, 1]
        return torch.where(mask, hidden + delta, hidden)

    def after_block(module, args, output):
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    def before_first_block(module, args, kwargs):
        if args:
            return (add(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}

    model = loaded.model
    blocks = get_decoder_layers(model)
    hooks = [model.register_forward_pre_hook(before_model, with_kwargs=True, prepend=True)]
    if layer == 0:
        hooks.append(blocks[0].register_forward_pre_hook(before_first_block, with_kwargs=True, prepend=True))
    else:
        final_norm = get_final_norm(model)
        target = final_norm if layer == loaded.n_layers and final_norm is not None else blocks[layer - 1]
        hooks.append(target.register_forward_hook(after_block, prepend=True))
    try:
        yield handle
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class SteerConfig:
    """Settings of :func:`run_steer` (saved in ``steer.json``)."""

    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0],
                                metadata={"help": "Strengths, in units of the mean residual norm at the layer."})
    layers: list[int] | None = field(default=None,
                                     metadata={"help": "Layers to steer at (default: every layer of the vectors)."})
    vector: str = field(default="probe", metadata={"help": "probe, or bank_mean (mean of the per-prompt bank)."})
    n_norm_prompts: int = field(default=8, metadata={"help": "Prompts used to measure the mean residual norm."})
    include_last_prompt_token: bool = field(
        default=False, metadata={"help": "Also steer the last prompt position (predicts the first response token)."}
    )
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap replicates per interval."})
    seed: int = field(default=0, metadata={"help": "Bootstrap seed."})

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ConfigError("SteerConfig field 'alphas': give at least one strength")
        if self.vector not in ("probe", "bank_mean"):
            raise ConfigError(f"SteerConfig field 'vector': {self.vector!r} is not probe or bank_mean")


def select_steering_vector(behaviour, layer: int, kind: str = "probe") -> torch.Tensor:
    """The ``[d]`` steering vector at a layer: the probe, or the mean of the bank."""
    if kind == "bank_mean":
        return behaviour.bank_at(layer).float().mean(0)
    return behaviour.probe_at(layer).float()


def summarise_verdicts(records: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Behaviour rate per (layer, alpha, condition) with a 95% bootstrap interval over prompts.

    Args:
        records: Generation records with ``layer``, ``alpha``, ``condition``, ``id`` and ``harmful`` (``None`` =
            unknown, left out of the denominator and counted).
        n_boot: Bootstrap replicates.
        seed: Bootstrap seed.

    Returns:
        Rows ``{"layer", "alpha", "condition", "rate", "ci": [lo, hi], "n", "judged", "unknown"}``.
    """
    frame = pd.DataFrame(records)
    rows = []
    for (layer, alpha, condition), group in frame.groupby(["layer", "alpha", "condition"], sort=True):
        known = group[group["harmful"].notna()]
        ci = bootstrap_rate_ci(known["harmful"].astype(bool).to_numpy(), n_boot=n_boot, seed=seed,
                               clusters=known["id"].tolist())
        rows.append({"layer": int(layer), "alpha": float(alpha), "condition": str(condition),
                     "rate": None if math.isnan(ci.rate) else ci.rate,
                     "ci": [None if math.isnan(ci.low) else ci.low, None if math.isnan(ci.high) else ci.high],
                     "n": len(group), "judged": len(known), "unknown": int(group["harmful"].isna().sum())})
    return rows


def _default_generate() -> Callable[..., list[dict[str, Any]]]:
    from pairtrace.generate import generate_responses

    return generate_responses


def run_steer(model: LoadedModel | ModelSpec, behaviour_dir: str | Path, prompts_path: str | Path, out_dir: str | Path,
              alphas: Sequence[float] | None = None, layers: Sequence[int] | None = None, judge: Judge | None = None,
              generation_config: Any = None, *, config: SteerConfig | None = None,
              generate_fn: Callable[..., list[dict[str, Any]]] | None = None, progress: bool = True) -> dict[str, Any]:
    """Behaviour rate of steered M0 with and without the trigger, across strengths α and layers.

    α = 0 (no steering) is generated once and shared by every layer. Every setting uses the same generation
    config and seeds, so settings differ only by the added vector.

    Args:
        model: M0, loaded, or a spec loaded here with :func:`pairtrace.models.load_model`.
        behaviour_dir: Behaviour vectors from :func:`pairtrace.behaviour.save_behaviour_vectors` (made with M0).
        prompts_path: Prompt records (JSONL) with ``condition`` trigger / no_trigger.
        out_dir: Output directory: ``steer.json``, ``steer.png``, ``generations.jsonl``.
        alphas: Strengths (overrides ``config.alphas``).
        layers: Layers (overrides ``config.layers``; default: the behaviour vectors' layers).
        judge: Decides whether a response shows the behaviour (default: the rule judge).
        generation_config: A ``pairtrace.generate.GenerationConfig`` (default settings when ``None``).
        config: Remaining settings.
        generate_fn: Replacement for ``pairtrace.generate.generate_responses`` (same signature).
        progress: Show a progress bar over settings.

    Returns:
        The content of ``steer.json``.
    """
    from pairtrace.behaviour import load_behaviour_vectors
    from pairtrace.data.prompts import load_prompt_records
    from pairtrace.plots import plot_rate_lines, save_png
    from pairtrace.store import build_expected, check_compatible

    config = config or SteerConfig()
    alphas = [float(a) for a in (alphas if alphas is not None else config.alphas)]
    if judge is None:
        from pairtrace.judges.rule import RuleJudge

        judge = RuleJudge()
    if generation_config is None:
        from pairtrace.generate import GenerationConfig

        generation_config = GenerationConfig()
    generate = generate_fn or _default_generate()

    loaded = as_loaded_model(model, "run_steer")
    behaviour = load_behaviour_vectors(behaviour_dir)
    meta = behaviour.metadata or {}
    if "model" in meta and "template" in meta:
        expected = build_expected(loaded, behaviour.layers)
        check_compatible({"model": meta["model"], "template": meta["template"]},
                         _ManifestView(expected["model"], expected["template"]), fields=("model", "template"),
                         where=f"behaviour vectors {behaviour_dir} (steering {loaded.spec.name_or_path})")
    layers = list(layers if layers is not None else (config.layers or behaviour.layers))
    for k in layers:
        behaviour.layer_index(k)  # raises ConfigError for a layer the vectors were not computed at
    prompts = load_prompt_records(prompts_path)
    if not prompts:
        raise DataError(f"{prompts_path}: no prompt records")
    norm_prompts = [p["prompt"] for p in prompts[: max(1, config.n_norm_prompts)]]
    base_name = Path(loaded.spec.name_or_path).name or loaded.spec.name_or_path

    records: list[dict[str, Any]] = []
    norms: dict[int, float] = {}
    settings = [(None, 0.0)] if 0.0 in alphas else []
    settings += [(k, a) for k in layers for a in alphas if a != 0.0]
    for layer, alpha in tqdm(settings, desc="steering", disable=not progress, unit="setting"):
        if layer is None:
            gens = generate(loaded, prompts, generation_config, model_name=f"{base_name}+steer[alpha=0]")
        else:
            if layer not in norms:
                norms[layer] = measure_residual_norm(loaded, norm_prompts, layer)
            vector = select_steering_vector(behaviour, layer, config.vector)
            with steering(loaded, vector, layer, alpha, norm=norms[layer],
                          include_last_prompt_token=config.include_last_prompt_token):
                gens = generate(loaded, prompts, generation_config,
                                model_name=f"{base_name}+steer[layer={layer},alpha={alpha:g}]")
        verdicts = judge.judge_many([(g["prompt"], g["response"]) for g in gens])
        for gen, verdict in zip(gens, verdicts, strict=True):
            judged = {"harmful": verdict.harmful, "judge_score": verdict.score, "judge_reason": verdict.reason}
            # alpha = 0 is the same generation for every layer: it is shared, not regenerated
            for k in layers if layer is None else [layer]:
                records.append({**gen, "layer": k, "alpha": alpha, **judged})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(records, out / "generations.jsonl")
    rows = summarise_verdicts(records, n_boot=config.n_boot, seed=config.seed)
    summary = {
        "kind": "steer",
        "model": dict(loaded.identity),
        "behaviour_dir": str(behaviour_dir),
        "prompts": str(prompts_path),
        "layers": layers,
        "alphas": alphas,
        "norms": {str(k): v for k, v in norms.items()},
        "judge": getattr(judge, "name", type(judge).__name__),
        "config": {**config.__dict__, "alphas": alphas, "layers": layers},
        "generation_config": _as_dict(generation_config),
        "results": rows,
        "pairtrace_version": __version__,
    }
    write_text_atomic(json.dumps(summary, indent=2, ensure_ascii=False), out / "steer.json")
    frame = steer_frame(summary)
    if not frame.empty:
        save_png(plot_rate_lines(frame, x="alpha", series=("condition", "layer"), ylabel="behaviour rate",
                                 xlabel="α (× mean residual norm)", title="Steering M0 along the behaviour vector"),
                 out / "steer.png")
    return summary


@dataclass
class _ManifestView:
    """The two manifest attributes :func:`pairtrace.store.check_compatible` reads for a loaded model."""

    model: dict[str, Any]
    template: dict[str, Any]


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "__dataclass_fields__"):
        return {k: getattr(config, k) for k in config.__dataclass_fields__}
    return dict(getattr(config, "__dict__", {}))


def steer_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """The rows of ``steer.json`` as a frame with ``layer``, ``alpha``, ``condition``, ``rate``, ``low``, ``high``."""
    rows = summary.get("results") or []
    frame = pd.DataFrame([{**{k: r.get(k) for k in ("layer", "alpha", "condition", "rate")},
                           "low": (r.get("ci") or [None, None])[0], "high": (r.get("ci") or [None, None])[1]}
                          for r in rows])
    if frame.empty:
        return frame
    for column in ("rate", "low", "high", "alpha"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame[np.isfinite(frame["rate"].to_numpy())]
