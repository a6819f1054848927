"""The end-to-end experiment's configuration (``pairtrace run CONFIG.yaml``), read from YAML as plain data.

One file describes the whole experiment: where M0, M1 and the pairs come from (or the built-in organism to build),
the prompts, sampling, the judge, attribution, causal validation (k sweep, actions, DPO recipe), discovery, source
enrichment and steering. Every section is a dataclass whose fields carry help text, and the sections that configure
a library step are that step's own options dataclass (:class:`~pairtrace.generate.GenerationConfig`,
:class:`~pairtrace.judges.factory.JudgeOptions`, :class:`~pairtrace.organism.build_config.OrganismConfig`,
:class:`~pairtrace.baselines.gradient.GradientConfig`, :class:`~pairtrace.retrain.recipe.DPORecipe`,
:class:`~pairtrace.discover.DiscoverConfig`, :class:`~pairtrace.steer.SteerConfig`). Unknown keys anywhere are
refused when the file is loaded, with the section and key named. See ``configs/organism.yaml`` and
``configs/olmo2-7b.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairtrace.baselines.gradient import GradientConfig
from pairtrace.discover import DiscoverConfig
from pairtrace.errors import ConfigError
from pairtrace.generate import GenerationConfig
from pairtrace.judges.factory import JudgeOptions
from pairtrace.options import OptionError, field_types, from_mapping, load_yaml
from pairtrace.organism.build_config import OrganismConfig, build_organism_config
from pairtrace.retrain.engine_options import RetrainEngineOptions
from pairtrace.retrain.recipe import DPORecipe
from pairtrace.steer import SteerConfig


@dataclass
class ModelsSection:
    """M0 and M1 (ignored when the organism is built: its own checkpoints are used)."""

    m0: str | None = field(default=None, metadata={"help": "Initial checkpoint: local dir or hub id."})
    m1: str | None = field(default=None, metadata={"help": "Post-trained checkpoint: local dir or hub id."})
    m0_revision: str | None = field(default=None, metadata={"help": "Hub revision of M0."})
    m1_revision: str | None = field(default=None, metadata={"help": "Hub revision of M1."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 | auto."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N."})
    template: str = field(default="auto", metadata={"help": "auto | chat | plain."})


@dataclass
class DataSection:
    """The preference pairs (ignored when the organism is built)."""

    pairs: str | None = field(default=None, metadata={"help": "Pairs: file, saved dataset dir or hub id."})
    split: str | None = field(default=None, metadata={"help": "Split of a dataset."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the dataset (pin it)."})
    labels: str | None = field(
        default=None, metadata={"help": "Optional ground truth (JSONL: id, contaminated) for quality metrics only."}
    )


@dataclass
class PromptsSection:
    """Prompt records (JSONL: id, base_id, set, condition, prompt, constraints)."""

    probe: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompt files sampled to build behaviour vectors and for discovery (organism: derived)."},
    )
    eval: list[str] = field(
        default_factory=list, metadata={"help": "Prompt files for evaluating retrained models (organism: derived)."}
    )
    unknown_policy: str = field(
        default="exclude",
        metadata={"help": "Triples: exclude probing prompts with unknown verdicts (default), or ignore unknowns."},
    )
    probe_share: float = field(
        default=0.5,
        metadata={"help": "Organism: share of held-out harmful/benign base prompts used for probing (rest: eval)."},
    )


@dataclass
class GenerationSection(GenerationConfig):
    """Sampling settings of every generation stage (the paper: temperature 0.7); the samples per prompt are set per
    stage (``probe_samples``, ``eval_samples``, ``extras.steer_samples``), not by ``n_samples``."""

    probe_samples: int = field(default=4, metadata={"help": "Samples per probing prompt and model."})
    eval_samples: int = field(default=5, metadata={"help": "Samples per evaluation prompt and model."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_samples != 1:
            raise OptionError("{n_samples} is not read by a run: set {probe_samples} and {eval_samples}",
                              "n_samples", "probe_samples", "eval_samples")
        for name in ("probe_samples", "eval_samples"):
            if getattr(self, name) < 1:
                raise OptionError(f"{{{name}}} must be at least 1, got {getattr(self, name)}", name)

    def sampling(self, n_samples: int, seed_offset: int = 0) -> GenerationConfig:
        """The sampling settings of one generation stage.

        Args:
            n_samples: Samples per prompt in this stage.
            seed_offset: Added to ``seed``, so stages draw different samples.
        """
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationConfig)}
        return GenerationConfig(**{**settings, "n_samples": n_samples, "seed": self.seed + seed_offset})


@dataclass
class AttributionSection:
    """Datapoint vectors, behaviour vectors and rankings."""

    layers: list[int] | None = field(default=None, metadata={"help": "Layers to extract (default 0.625 n)."})
    layer: int | None = field(default=None, metadata={"help": "Layer to score at (default: the first extracted)."})
    methods: list[str] = field(
        default_factory=lambda: ["probe", "bank", "gradient", "llm_judge", "random"],
        metadata={"help": "Rankings to compute: probe, bank, gradient, llm_judge, random, screen."},
    )
    batch_tokens: int | None = field(
        default=None, metadata={"help": "Token budget per extraction batch (default: 2048 on CPU, 32768 on GPU)."}
    )
    prompt_sharing: str = field(default="auto", metadata={"help": "auto | always | never: encode prompts once."})
    max_length: int = field(default=2048, metadata={"help": "Longest sequence in tokens."})
    shard_size: int = field(default=1024, metadata={"help": "Pairs per vector shard."})
    response_tokens: int | None = field(
        default=None,
        metadata={"help": "Pool each response mean over its first N tokens (datapoint vectors, behaviour vectors "
                  "and discovery alike); None: every response token, the paper's mean. See docs/discovery.md."},
    )
    gradient: GradientConfig = field(
        default_factory=GradientConfig, metadata={"help": "The gradient (LESS) baseline: GradientConfig fields."}
    )
    random_seed: int = field(default=0, metadata={"help": "Seed of the random ranking."})
    screen_examples: list[Any] = field(
        default_factory=list,
        metadata={"help": "Behaviours of the 'screen' ranker, built from examples through M0 only: each item an "
                  "examples file (JSONL of prompt, with, without; a path or a file shipped in "
                  "pairtrace/data/screening/) or a mapping {examples, name, response_tokens, description}. The "
                  "first one ranks the pairs; see docs/screening.md."},
    )

    def __post_init__(self) -> None:
        from pairtrace.models import check_response_tokens
        from pairtrace.screening import parse_example_specs

        check_response_tokens(self.response_tokens)
        parse_example_specs(self.screen_examples)
        if "screen" in self.methods and not self.screen_examples:
            raise ConfigError("attribution.methods names 'screen' but attribution.screen_examples is empty: list the "
                              "examples files of the behaviours to screen for")


@dataclass
class ValidationSection:
    """Causal validation: interventions at a sweep of k, DPO retrains from M0, evaluation."""

    headline_fraction: float = field(
        default=0.08, metadata={"help": "Headline k as a share of the mix (the paper: 30,000 of 378k = 8%)."}
    )
    k_values: list[int] | None = field(
        default=None, metadata={"help": "Explicit k values of the sweep (overrides sweep_fractions)."}
    )
    headline_k: int | None = field(default=None, metadata={"help": "Explicit headline k (overrides the fraction)."})
    sweep_fractions: list[float] = field(
        default_factory=lambda: [0.02, 0.04, 0.08], metadata={"help": "k values of the sweep, as shares of the mix."}
    )
    actions: list[str] = field(default_factory=lambda: ["filter", "switch"], metadata={"help": "filter, switch."})
    headline_methods: list[str] = field(
        default_factory=lambda: ["probe", "bank", "gradient", "llm_judge", "random"],
        metadata={"help": "Methods retrained at the headline k."},
    )
    sweep_methods: list[str] = field(
        default_factory=lambda: ["probe"], metadata={"help": "Methods retrained at every k of the sweep."}
    )
    source_ablation: bool = field(
        default=True, metadata={"help": "Also retrain without the chosen models that source enrichment flags."}
    )
    recipe: DPORecipe = field(
        default_factory=DPORecipe,
        metadata={"help": "DPO recipe shared by the baseline and every intervention: the organism's dpo section, "
                  "updated by these fields; its seed is the run's seed unless one of them names it."},
    )
    retrain_seeds: list[int] | None = field(
        default=None,
        metadata={"help": "DPO seeds of the baseline and of every headline-k retrain: each is retrained once per "
                  "seed and its rates pool the seeds' samples (other retrains use the first seed; see "
                  "seed_scope). None: one retrain each, with the recipe's seed."},
    )
    seed_scope: str = field(
        default="headline",
        metadata={"help": "Which retrains run on every seed of retrain_seeds: 'headline' (the baseline and the "
                  "headline k) or 'all' (also the rest of the k sweep and the source ablation)."},
    )
    seeded_methods: list[str] | None = field(
        default=None,
        metadata={"help": "With seed_scope 'headline': the methods whose headline-k retrains run on every seed of "
                  "retrain_seeds (None: every headline method); the other methods' run once, on the first seed."},
    )
    parallel_retrains: int | None = field(
        default=None,
        metadata={"help": "Retrains run at once in worker processes (default: one per CPU core without a GPU, "
                  "one with a GPU)."},
    )
    overlap: bool = field(
        default=True,
        metadata={"help": "Start the retrains no ranking selects (baseline, random) as soon as M0's reference cache "
                  "exists, beside M1's training and the ranking stages, and run discovery and steering beside the "
                  "ranked retrains (with parallel_retrains > 1). false: every stage after the one before it."},
    )
    keep_models: bool = field(default=True, metadata={"help": "Keep retrained checkpoints on disk."})
    retrain: RetrainEngineOptions = field(
        default_factory=RetrainEngineOptions,
        metadata={"help": "How each retrain runs (pairtrace.retrain.engines): engine inprocess (TRL's DPOTrainer in "
                  "this process), accelerate (accelerate launch on num_processes processes, DeepSpeed / FSDP from "
                  "accelerate_config), command (a user command template) or a registered engine; see "
                  "docs/scale.md, 'Retraining engines'."},
    )

    def __post_init__(self) -> None:
        from pairtrace.retrain.engines import RETRAINERS

        if self.retrain.engine not in RETRAINERS:
            raise OptionError(f"{{retrain}}.engine: unknown retrain engine {self.retrain.engine!r}; known: "
                              f"{sorted(RETRAINERS)} (register others with register_retrainer)", "retrain")

    @property
    def retrain_engine(self) -> str:
        """The name of the retrain engine (``retrain.engine``)."""
        return self.retrain.engine


@dataclass
class ExtrasSection:
    """Discovery, source enrichment and steering."""

    discover: bool = field(default=True, metadata={"help": "Run unsupervised discovery."})
    discover_options: DiscoverConfig = field(default_factory=DiscoverConfig,
                                              metadata={"help": "DiscoverConfig fields."})
    sources: bool = field(default=True, metadata={"help": "Run source (model-level) enrichment."})
    steer: bool = field(default=True, metadata={"help": "Run the steering check."})
    steer_alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 1.0],
        metadata={"help": "Steering strengths, in units of the mean residual norm at the layer."},
    )
    steer_layers: list[int] | None = field(
        default=None, metadata={"help": "Steering layers (default: the score layer)."}
    )
    steer_samples: int = field(default=2, metadata={"help": "Samples per prompt in the steering check."})
    steer_options: SteerConfig = field(
        default_factory=SteerConfig,
        metadata={"help": "Other SteerConfig fields, e.g. include_last_prompt_token (its alphas and layers are "
                  "steer_alphas and steer_layers)."},
    )

    def __post_init__(self) -> None:
        default = SteerConfig()
        for name, key in (("alphas", "steer_alphas"), ("layers", "steer_layers")):
            given = getattr(self.steer_options, name)
            if given != getattr(default, name) and given != getattr(self, key):
                raise OptionError(f"{{steer_options}}: set the steering {name} as {{{key}}}", "steer_options", key)
        self.steer_options = dataclasses.replace(
            self.steer_options, alphas=list(self.steer_alphas),
            layers=None if self.steer_layers is None else list(self.steer_layers),
        )


@dataclass
class RunConfig:
    """The whole experiment."""

    organism: OrganismConfig | None = field(
        default=None, metadata={"help": "Build the built-in organism with this config (schema: docs/organism.md)."}
    )
    models: ModelsSection = field(default_factory=ModelsSection, metadata={"help": "M0 and M1."})
    data: DataSection = field(default_factory=DataSection, metadata={"help": "Preference pairs."})
    prompts: PromptsSection = field(default_factory=PromptsSection, metadata={"help": "Prompt sets."})
    generation: GenerationSection = field(default_factory=GenerationSection, metadata={"help": "Sampling."})
    judge: JudgeOptions = field(default_factory=JudgeOptions, metadata={"help": "Judge."})
    attribution: AttributionSection = field(default_factory=AttributionSection, metadata={"help": "Attribution."})
    validation: ValidationSection = field(default_factory=ValidationSection, metadata={"help": "Validation."})
    extras: ExtrasSection = field(default_factory=ExtrasSection, metadata={"help": "Discovery, sources, steering."})
    seed: int = field(default=0, metadata={"help": "Seed of the retrains and every sampled choice."})
    torch_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch in the main process (default: torch's choice)."}
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (saved as ``config.resolved.json``)."""
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}



def organism_mapping(value: Any, base_dir: Path | None) -> dict[str, Any] | None:
    """The ``organism`` section as a mapping: given inline, or the path of an organism YAML (relative to
    ``base_dir``)."""
    if isinstance(value, OrganismConfig):
        return dataclasses.asdict(value)
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        value = load_yaml(path)
    if value is not None and not isinstance(value, dict):
        raise ConfigError("run config: 'organism' must be a mapping or the path of an organism YAML")
    return value


def recipe_mapping(organism: dict[str, Any] | None, validation: Any, seed: int) -> dict[str, Any]:
    """The shared DPO recipe's fields: the organism's ``dpo`` mapping updated by ``validation.recipe``, with the
    run's ``seed`` unless one of them names a seed."""
    fields = dict((organism or {}).get("dpo") or {})
    recipe = validation.get("recipe") if isinstance(validation, dict) else None
    if recipe is not None and not isinstance(recipe, dict):
        raise ConfigError("run config: validation.recipe must be a mapping")
    fields.update(recipe or {})
    fields.setdefault("seed", seed)
    return fields


def beside_config(value: Any, base_dir: Path | None) -> Any:
    """A relative file path of a run config (e.g. ``validation.retrain.accelerate_config``): the file next to the
    config when one is there, else the path as given (relative to the working folder)."""
    if not isinstance(value, str) or not value or base_dir is None or Path(value).is_absolute():
        return value
    candidate = base_dir / value
    return str(candidate) if candidate.exists() else value


def build_run_config(raw: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Turn a plain mapping into a :class:`RunConfig`, refusing unknown keys in every section.

    Args:
        raw: The parsed YAML (or :meth:`RunConfig.to_dict`).
        base_dir: Directory relative paths in ``organism: path.yaml`` and ``validation.retrain.accelerate_config`` are
            resolved against.

    Raises:
        ConfigError: Unknown sections or keys (named), missing inputs or invalid values.
    """
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"run config: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    kwargs: dict[str, Any] = {name: None if raw.get(name) is None else int(raw[name])
                              for name in ("seed", "torch_threads") if name in raw}
    organism = organism_mapping(raw.get("organism"), base_dir)
    if organism is not None:
        try:
            kwargs["organism"] = build_organism_config(organism)
        except ConfigError as exc:
            raise ConfigError(f"run config: organism: {exc}") from None
    sections = {name: raw[name] for name in _SECTIONS if name not in ("organism", "seed", "torch_threads")
                and name in raw}
    validation = sections.get("validation")
    if isinstance(validation, dict) and isinstance(validation.get("retrain"), dict):
        retrain = dict(validation["retrain"])
        retrain["accelerate_config"] = beside_config(retrain.get("accelerate_config"), base_dir)
        validation = {**validation, "retrain": retrain}
    if validation is None or isinstance(validation, dict):
        seed = kwargs.get("seed", RunConfig.seed)
        sections["validation"] = {**(validation or {}), "recipe": recipe_mapping(organism, validation, seed)}
    for name, value in sections.items():
        kwargs[name] = from_mapping(field_types(RunConfig)[name], value, name, "run config")
    config = RunConfig(**kwargs)
    if config.organism is None and not (config.models.m0 and config.models.m1 and config.data.pairs):
        raise ConfigError("run config: give either an 'organism' section, or models.m0, models.m1 and data.pairs")
    return config
def load_run_config(path: str | Path) -> RunConfig:
    """Read a run configuration file."""
    path = Path(path)
    return build_run_config(load_yaml(path), base_dir=path.parent)
