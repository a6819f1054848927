"""The retrainer protocol: how a modified mix becomes a model trained from M0.

Causal validation never meets a training recipe's internals: it hands a :class:`RetrainRequest` (M0, the exported
pairs, an output folder, the shared :class:`~pairtrace.retrain.recipe.DPORecipe`) to a registered engine and gets
back a :class:`RetrainSummary` and a Hugging Face model folder. The engines: ``inprocess`` (TRL's ``DPOTrainer`` in
this process, float32: the built-in organism's), ``accelerate`` (the same trainer under ``accelerate launch`` on N
processes, with DDP, DeepSpeed or FSDP) and ``command`` (a user command template); the request carries the
:class:`~pairtrace.retrain.engine_options.RetrainEngineOptions`. Users register their own train function with
:func:`register_retrainer`.

    @register_retrainer("my_cluster")
    def train_on_cluster(request: RetrainRequest) -> RetrainSummary: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.retrain.engine_options import RetrainEngineOptions
from pairtrace.retrain.recipe import DPORecipe

if TYPE_CHECKING:
    from pairtrace.models import ModelSpec


@dataclass(frozen=True)
class RetrainRequest:
    """One retrain from M0.

    Attributes:
        m0: The starting checkpoint, also the frozen DPO reference.
        train_file: The pairs to train on (conversational JSONL, chosen/rejected message lists).
        model_dir: Where the trained model folder must be left (Hugging Face format, with its tokenizer).
        recipe: The DPO hyper-parameters shared by every retrain of a run (its ``seed`` is this retrain's seed).
        ref_cache_dir: Folder caching M0's reference log-probabilities across retrains (``None``: no cache).
        progress: Show progress bars.
        options: The engine and its options (``validation.retrain`` of a run config).
    """

    m0: ModelSpec
    train_file: Path
    model_dir: Path
    recipe: DPORecipe
    ref_cache_dir: Path | None = None
    progress: bool = True
    options: RetrainEngineOptions = field(default_factory=RetrainEngineOptions)


@dataclass(frozen=True)
class RetrainSummary:
    """What every engine reports: pairs trained on, optimisation steps, final training loss, seconds."""

    n_pairs: int | None
    steps: int | None
    train_loss: float | None
    seconds: float | None
    engine: str

    def to_dict(self) -> dict[str, Any]:
        return {"n_pairs": self.n_pairs, "steps": self.steps, "train_loss": self.train_loss,
                "seconds": self.seconds, "engine": self.engine}


Retrainer = Callable[[RetrainRequest], RetrainSummary]
RETRAINERS: dict[str, Retrainer] = {}
"""Registered retrain engines by name."""


def register_retrainer(name: str) -> Callable[[Retrainer], Retrainer]:
    """Register ``fn`` as the retrain engine ``name`` (decorator)."""

    def decorate(fn: Retrainer) -> Retrainer:
        RETRAINERS[name] = fn
        return fn

    return decorate


def get_retrainer(name: str) -> Retrainer:
    """The engine registered as ``name``.

    Raises:
        ConfigError: No such engine.
    """
    if name not in RETRAINERS:
        raise ConfigError(f"unknown retrain engine {name!r}; known: {sorted(RETRAINERS)}")
    return RETRAINERS[name]


def resolve_local_m0(spec: ModelSpec) -> ModelSpec:
    """M0 as a local folder: a hub id at a pinned revision becomes its snapshot in the Hugging Face cache
    (downloaded first unless ``HF_HUB_OFFLINE`` is set), so every engine trains from files on disk.

    Raises:
        ConfigError: The revision is neither cached nor downloadable.
    """
    from dataclasses import replace

    if Path(spec.name_or_path).is_dir():
        return spec
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=spec.name_or_path, revision=spec.revision)
    except Exception as exc:  # offline without the revision cached, unknown repo, no network
        raise ConfigError(f"M0 {spec.name_or_path!r} at revision {spec.revision!r} is not available as files "
                          f"({type(exc).__name__}: {exc}); download it or point models.m0 at a local folder") from exc
    return replace(spec, name_or_path=folder, revision=None)


def check_model_folder(model_dir: Path, engine: str) -> None:
    """Refuse a retrain that left no usable model folder (weights and config)."""
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if not (model_dir / "config.json").is_file() or not has_weights:
        raise PairtraceError(f"retrain engine {engine!r} left no model in {model_dir} (config.json and weights)")


@register_retrainer("inprocess")
def retrain_in_process(request: RetrainRequest) -> RetrainSummary:
    """TRL's ``DPOTrainer`` in this process (float32, deterministic for the recipe's seed): the organism's engine."""
    from pairtrace.retrain.trl_dpo import train_dpo

    if request.m0.revision is not None:
        raise ConfigError("the inprocess retrain engine trains from a local M0 folder; download the pinned revision "
                          f"of {request.m0.name_or_path!r} first and point models.m0 at it")
    info = train_dpo(request.m0.name_or_path, request.train_file, request.model_dir, request.recipe,
                     progress=request.progress, ref_cache_dir=request.ref_cache_dir)
    check_model_folder(Path(request.model_dir), "inprocess")
    return RetrainSummary(n_pairs=info.get("n_pairs"), steps=info.get("steps"), train_loss=info.get("train_loss"),
                          seconds=info.get("seconds"), engine="inprocess")


@register_retrainer("accelerate")
def retrain_with_accelerate(request: RetrainRequest) -> RetrainSummary:
    """TRL's ``DPOTrainer`` under ``accelerate launch`` on ``options.num_processes`` processes (bf16 on GPUs that
    support it, gradient checkpointing and DeepSpeed / FSDP as asked), the recipe's global batch kept exact."""
    from pairtrace.retrain.launch import retrain_with_accelerate as run

    return run(request)


@register_retrainer("command")
def retrain_with_command(request: RetrainRequest) -> RetrainSummary:
    """A user command template (e.g. open-instruct's DPO script) filled from the request."""
    from pairtrace.retrain.launch import retrain_with_command as run

    return run(request)
