"""The end-to-end experiment's configuration (``pairtrace run CONFIG.yaml``), read from YAML as plain data.

One file describes the whole experiment: where M0, M1 and the pairs come from (or the built-in organism to build),
the prompts, sampling, the judge, attribution, causal validation (k sweep, actions, DPO recipe), discovery, source
enrichment and steering. Every section is a dataclass whose fields carry help text; unknown keys are refused with
the section and key named. See ``configs/organism.yaml`` and ``configs/olmo2-7b.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairtrace.options import load_yaml
from pairtrace.errors import ConfigError


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
class GenerationSection:
    """Sampling settings (the paper: temperature 0.7)."""

    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus threshold."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest response."})
    probe_samples: int = field(default=4, metadata={"help": "Samples per probing prompt and model."})
    eval_samples: int = field(default=5, metadata={"help": "Samples per evaluation prompt and model."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


@dataclass
class JudgeSection:
    """The judge of harmfulness (rule: exact on the organism; openai: any chat-completions endpoint)."""

    kind: str = field(default="rule", metadata={"help": "rule | openai."})
    base_url: str | None = field(default=None, metadata={"help": "Endpoint base URL (openai)."})
    model: str | None = field(default=None, metadata={"help": "Judge model name (openai)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Env var with the key (openai)."})
    max_concurrency: int = field(default=8, metadata={"help": "Requests in flight (openai)."})
    max_retries: int = field(default=5, metadata={"help": "Retries before unknown (openai)."})
    timeout_s: float = field(default=60.0, metadata={"help": "Seconds per request (openai)."})


@dataclass
class AttributionSection:
    """Datapoint vectors, behaviour vectors and rankings."""

    layers: list[int] | None = field(default=None, metadata={"help": "Layers to extract (default 0.625 n)."})
    layer: int | None = field(default=None, metadata={"help": "Layer to score at (default: the first extracted)."})
    methods: list[str] = field(
        default_factory=lambda: ["probe", "bank", "gradient", "llm_judge", "random"],
        metadata={"help": "Rankings to compute: probe, bank, gradient, llm_judge, random."},
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
    gradient: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "GradientConfig fields of the gradient (LESS) baseline."}
    )
    random_seed: int = field(default=0, metadata={"help": "Seed of the random ranking."})

    def __post_init__(self) -> None:
        from pairtrace.models import check_response_tokens

        check_response_tokens(self.response_tokens)


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
    recipe: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "DPO recipe fields shared by the baseline and every intervention."}
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
    parallel_retrains: int | None = field(
        default=None,
        metadata={"help": "Retrains run at once in worker processes (default: one per CPU core without a GPU, "
                  "one with a GPU)."},
    )
    keep_models: bool = field(default=True, metadata={"help": "Keep retrained checkpoints on disk."})
    dry_run: bool = field(
        default=False, metadata={"help": "Validate the configuration and print the plan without running anything."}
    )


@dataclass
class ExtrasSection:
    """Discovery, source enrichment and steering."""

    discover: bool = field(default=True, metadata={"help": "Run unsupervised discovery."})
    discover_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "DiscoverConfig fields."})
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
    steer_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Other SteerConfig fields, e.g. include_last_prompt_token (alphas and layers above)."},
    )


@dataclass
class RunConfig:
    """The whole experiment."""

    organism: dict[str, Any] | None = field(
        default=None, metadata={"help": "Build the built-in organism with this config (schema: docs/organism.md)."}
    )
    models: ModelsSection = field(default_factory=ModelsSection, metadata={"help": "M0 and M1."})
    data: DataSection = field(default_factory=DataSection, metadata={"help": "Preference pairs."})
    prompts: PromptsSection = field(default_factory=PromptsSection, metadata={"help": "Prompt sets."})
    generation: GenerationSection = field(default_factory=GenerationSection, metadata={"help": "Sampling."})
    judge: JudgeSection = field(default_factory=JudgeSection, metadata={"help": "Judge."})
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

    def section_hash(self, *names: str, extra: Any = None) -> str:
        """SHA-256 of some sections: identifies a stage's inputs for caching.

        Fields added to a section after runs were made (:data:`ADDED_FIELDS`) count only when they differ from
        their default, so a finished run stays cached across the upgrade.
        """
        data = self.to_dict()
        for section, name, default in ADDED_FIELDS:
            if isinstance(data.get(section), dict) and data[section].get(name, default) == default:
                data[section].pop(name, None)
        picked = {n: data[n] for n in names}
        picked["_extra"] = extra
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}

ADDED_FIELDS: tuple[tuple[str, str, Any], ...] = (("attribution", "response_tokens", None),)
"""(section, field, default) of fields left out of stage keys while at their default."""


def _build_section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"run config: section '{name}' must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"run config: section '{name}' has unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"run config: section '{name}': {exc}") from exc


def build_run_config(raw: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Turn a plain mapping into a :class:`RunConfig`, refusing unknown keys.

    Args:
        raw: The parsed YAML.
        base_dir: Directory relative paths in ``organism: path.yaml`` are resolved against.
    """
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"run config: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    kwargs: dict[str, Any] = {}
    for name, f in _SECTIONS.items():
        if name not in raw:
            continue
        value = raw[name]
        if name == "organism":
            if isinstance(value, str):
                path = Path(value)
                if not path.is_absolute() and base_dir is not None:
                    path = base_dir / path
                value = load_yaml(path)
            if value is not None and not isinstance(value, dict):
                raise ConfigError("run config: 'organism' must be a mapping or the path of an organism YAML")
            kwargs[name] = value
        elif name in ("seed", "torch_threads"):
            kwargs[name] = None if value is None else int(value)
        else:
            kwargs[name] = _build_section(f.default_factory, value, name)  # type: ignore[misc]
    config = RunConfig(**kwargs)
    if config.organism is None and not (config.models.m0 and config.models.m1 and config.data.pairs):
        raise ConfigError("run config: give either an 'organism' section, or models.m0, models.m1 and data.pairs")
    return config


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run configuration file."""
    path = Path(path)
    return build_run_config(load_yaml(path), base_dir=path.parent)
