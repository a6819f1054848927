"""The run context: the one object every stage of an experiment receives.

It alone turns a model spec into a loaded model (dtype, device, revision and chat template from the run config,
each model loaded once), builds the judge and the sampling settings of a stage, reads the pairs once, and owns the
run's stage cache. Stages never load a model from a path on their own.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtrace.records import write_json_atomic
from pairtrace.stage_cache import StageCache, chain_key, file_digest, source_digest

if TYPE_CHECKING:
    from pairtrace.experiment.run_config import RunConfig
    from pairtrace.generate import GenerationConfig
    from pairtrace.judges.base import Judge
    from pairtrace.models import LoadedModel, ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    """Where a run's models, pairs and prompts come from, once resolved (built organism or configured).

    Attributes:
        m0: The initial checkpoint (local folder or hub id).
        m1: The post-trained checkpoint.
        m0_revision: Hub revision of M0 (``None`` for a local folder).
        m1_revision: Hub revision of M1.
        pairs: The preference pairs (file, saved dataset folder or hub id).
        split: Split of a dataset.
        pairs_revision: Hub revision of the dataset.
        labels: Optional ground truth (quality metrics only).
        probe_prompts: Prompt records sampled to build the behaviour vectors.
        eval_prompts: Prompt records on which every retrain is evaluated.
        ref_cache: Folder caching M0's reference log-probabilities across retrains.
        organism_summary: The organism build's summary, when the run built it.
    """

    m0: str
    m1: str
    pairs: str
    probe_prompts: str
    eval_prompts: str
    ref_cache: str
    m0_revision: str | None = None
    m1_revision: str | None = None
    split: str | None = None
    pairs_revision: str | None = None
    labels: str | None = None
    organism_summary: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (passed to retrain worker processes)."""
        return dataclasses.asdict(self)

    def model_path(self, which: str) -> str:
        """The folder or hub id of ``m0`` or ``m1``."""
        return {"m0": self.m0, "m1": self.m1}[which]

    def labels_path(self) -> Path | None:
        """The ground-truth file, if the run has one on disk."""
        return Path(self.labels) if self.labels and Path(self.labels).is_file() else None


def model_digest(name_or_path: str, revision: str | None = None) -> str:
    """What identifies a model for caching: a local folder's weights fingerprint and the content of its other
    (tokenizer, config, template) files; a hub id with its revision otherwise."""
    from pairtrace.models import compute_weights_fingerprint

    path = Path(name_or_path)
    if not path.is_dir():
        return source_digest(name_or_path, revision)
    small = sorted(p for p in path.iterdir() if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth"))
    return chain_key(compute_weights_fingerprint(path) or "", *(f"{p.name}={file_digest(p)}" for p in small))


class RunContext:
    """One experiment directory with its configuration, resolved inputs, loaded models and stage cache.

    Args:
        config: The run configuration.
        out_dir: Output directory (created; reused to resume).
        progress: Show progress bars.
        inputs: Resolved inputs (set later by :func:`pairtrace.experiment.inputs.resolve_inputs` when omitted).
        write_config: Save ``config.resolved.json`` (the main process does; retrain workers do not).
    """

    def __init__(self, config: RunConfig, out_dir: str | Path, *, progress: bool = True,
                 inputs: Inputs | None = None, write_config: bool = True) -> None:
        self.config = config
        self.out = Path(out_dir).resolve()  # stage results hold paths: never relative to the cwd
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.cache = StageCache(self.out / "stages")
        self._inputs = inputs
        self._models: dict[str, LoadedModel] = {}
        self._specs: dict[str, ModelSpec] = {}
        self._models_digest: str | None = None
        self._m0_digest: str | None = None
        self._judge: Judge | None = None
        self._pairs: Any = None
        self._engine: str | None = None
        self.model_loads: list[str] = []
        """Names of the models loaded so far, in order (each model once)."""
        if not progress:
            quiet_libraries()
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        if write_config:
            write_json_atomic(config.to_dict(), self.out / "config.resolved.json")

    # ------------------------------------------------------------------ inputs
    @property
    def inputs(self) -> Inputs:
        """The resolved inputs."""
        if self._inputs is None:
            raise RuntimeError("the run's inputs are not resolved yet (resolve_inputs)")
        return self._inputs

    @inputs.setter
    def inputs(self, value: Inputs) -> None:
        self._inputs = value
        self._models_digest = self._m0_digest = None

    def path(self, *parts: str) -> Path:
        """A path inside the run directory."""
        return self.out.joinpath(*parts)

    # ------------------------------------------------------------------ models
    def model_spec(self, name_or_path: str | Path, revision: str | None = None) -> ModelSpec:
        """The spec of a model of this run: the run's dtype, device and chat template."""
        from pairtrace.models import ModelSpec

        m = self.config.models
        return ModelSpec(name_or_path=str(name_or_path), revision=revision, dtype=m.dtype, device=m.device,
                         chat_template=m.template)

    def register(self, name: str, spec: ModelSpec) -> None:
        """Make a model known to the run under ``name`` (e.g. a retrained model), to be loaded by :meth:`model`."""
        self._specs[name] = spec

    def spec_of(self, name: str) -> ModelSpec:
        """The spec of ``m0``, ``m1`` (the resolved inputs with their revisions) or a registered model."""
        if name in ("m0", "m1"):
            return self.model_spec(self.inputs.model_path(name), getattr(self.inputs, f"{name}_revision"))
        if name not in self._specs:
            raise KeyError(f"no model named {name!r} in this run")
        return self._specs[name]

    def model(self, name: str) -> LoadedModel:
        """The model ``name`` (M0, M1 or a registered one), loaded once with the run's options: the only place a
        run loads a model."""
        if name not in self._models:
            from pairtrace.models import load_model

            spec = self.spec_of(name)
            logger.info("loading %s from %s (%s)", name, spec.name_or_path, spec.dtype)
            self._models[name] = load_model(spec)
            self.model_loads.append(name)
        return self._models[name]

    # ------------------------------------------------------------------ generation engine
    def generation_engine(self) -> str:
        """The engine of the run's probe and evaluation generations, ``hf`` or ``vllm``: ``generation.backend``
        resolved once on this machine (:func:`pairtrace.generation_engines.resolve_engine`).

        Raises:
            ConfigError: ``generation.backend: vllm`` where vLLM or a GPU is missing (named, with the fix).
        """
        if self._engine is None:
            from pairtrace.generation_engines import resolve_engine

            self._engine = resolve_engine(self.config.generation.backend, self.config.models.device)
        return self._engine

    def generation_model(self, name: str) -> LoadedModel | ModelSpec:
        """What the generation engine needs for model ``name``: the loaded model for Hugging Face (loaded once,
        shared with the other stages), the spec alone for vLLM (which loads the weights itself; the Hugging Face
        copy, if this process holds one, is released first so the weights are never in memory twice)."""
        if self.generation_engine() == "hf":
            return self.model(name)
        if name in self._models:
            logger.info("releasing the Hugging Face copy of %s before vLLM loads it", name)
            self.release(name)
        return self.spec_of(name)

    def generation_key(self) -> dict[str, Any]:
        """The sampling settings as a stage key: ``generation`` without its ``backend`` setting, plus the engine
        it resolved to when that is not Hugging Face (so keys of Hugging Face runs are those of runs made before
        the backend option existed, and vLLM samples never pass for Hugging Face ones)."""
        settings = dataclasses.asdict(self.config.generation)
        settings.pop("backend", None)
        engine = self.generation_engine()
        return settings if engine == "hf" else {**settings, "engine": engine}

    def release(self, name: str) -> None:
        """Drop a loaded model (e.g. M1 once its generations are sampled), freeing its memory."""
        if self._models.pop(name, None) is not None:
            import gc

            gc.collect()

    # ------------------------------------------------------------------ judge, sampling, pairs
    def judge(self) -> Judge:
        """The configured judge (built once)."""
        if self._judge is None:
            from pairtrace.judges.factory import build_judge

            self._judge = build_judge(self.config.judge)
        return self._judge

    def sampling(self, n_samples: int, seed_offset: int = 0) -> GenerationConfig:
        """Sampling settings of one generation stage: the run's, with its sample count and seed offset."""
        return self.config.generation.sampling(n_samples, seed_offset)

    def pairs(self) -> Any:
        """The preference pairs (read once)."""
        if self._pairs is None:
            from pairtrace.data.pairs import load_pairs

            i = self.inputs
            self._pairs = load_pairs(i.pairs, split=i.split, revision=i.pairs_revision)
        return self._pairs

    # ------------------------------------------------------------------ digests of inputs (stage keys)
    def pairs_digest(self) -> str:
        """Content digest of the pairs (a local file or folder), or their hub id, revision and split."""
        i = self.inputs
        return chain_key(source_digest(i.pairs, i.pairs_revision), i.split or "")

    def models_digest(self) -> str:
        """Digest of M0 and M1 and of the options they are loaded with (computed once: every retrain's key uses
        it)."""
        if self._models_digest is None:
            i = self.inputs
            self._models_digest = chain_key(model_digest(i.m0, i.m0_revision), model_digest(i.m1, i.m1_revision),
                                            dataclasses.asdict(self.config.models))
        return self._models_digest

    def m0_digest(self) -> str:
        """Digest of M0 and of the options models are loaded with: what a retrain from M0 depends on (it never
        reads M1, so a retrain that needs no ranking can start before M1 exists); computed once."""
        if self._m0_digest is None:
            i = self.inputs
            self._m0_digest = chain_key(model_digest(i.m0, i.m0_revision), dataclasses.asdict(self.config.models))
        return self._m0_digest

    def labels_digest(self) -> str:
        """Digest of the ground-truth labels (``none`` without them)."""
        path = self.inputs.labels_path()
        return file_digest(path) if path else "none"


def quiet_libraries() -> None:
    """Silence third-party progress bars and deprecation chatter (pairtrace's own logging stays)."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")
