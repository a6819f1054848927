"""The organism's configuration: data splits, tokenizer, model, SFT, preference mix, planted behaviours, DPO, eval.

Loaded from YAML (``configs/organism-build.yaml``, or the ``organism`` section of a run config); the schema is
documented in ``docs/organism.md``. Every section is a dataclass whose fields carry help text; unknown keys are
rejected with the section and key named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError
from pairtrace.options import coerce_number, field_types
from pairtrace.organism.templates import DEFAULT_SIGN_OFF, REFUSALS, STYLES
from pairtrace.retrain.recipe import DPORecipe

SLICE_KINDS = ("clean", "benign", "contaminated", "decoy")
PLANTED_KINDS = ("benign", "contaminated")
"""Kinds of the planted behaviours: M0 shows them at their ``base_rate``, DPO on their pairs amplifies them."""
PROMPT_POOLS = ("harmful", "benign", "xstest_unsafe")
HARMFUL_POOLS = ("harmful", "xstest_unsafe")
"""Request pools whose requests a harmfulness judge reads as harmful."""
SFT_POOLS = ("harmful", "benign")
"""Request pools the SFT examples are drawn from."""
TRIGGERS = ("none", "distractors", "suffix")

MOVED_KEYS: dict[tuple[str, str], str] = {
    ("SFTSettings", "harmful_trigger_compliance"): (
        "M0's base rate is now set per behaviour: behaviours[].base_rate (e.g. base_rate: 0.12 on the "
        "contaminated behaviour)"
    ),
    ("SFTSettings", "habit_fraction"): (
        "M0's base rate is now set per behaviour: behaviours[].base_rate (e.g. base_rate: 0.1 on the sign_off "
        "behaviour)"
    ),
    ("SliceSpec", "trigger_text"): (
        "replaced by 'trigger_texts', a list of phrasings (heldout_triggers holds out the last ones for evaluation)"
    ),
}
"""Removed keys -> where their setting went (a config still using one is rejected with this message)."""


@dataclass
class DataSettings:
    """Which shared prompts are used, and which are held out for evaluation only."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Shared data folder (default: PAIRTRACE_SHARED_DATA or <repo>/../shared/data)."},
    )
    heldout_harmful: int = field(default=60, metadata={"help": "AdvBench requests held out for evaluation."})
    heldout_benign: int = field(default=60, metadata={"help": "IFEval prompts held out for evaluation."})
    heldout_xstest: int = field(
        default=250,
        metadata={"help": "XSTest safe prompts held out for evaluation (the rest are benign training requests)."},
    )
    max_prompt_chars: int = field(
        default=200, metadata={"help": "IFEval prompts longer than this are not used (keeps sequences short)."}
    )
    xstest_unsafe_as_harmful: bool = field(
        default=False, metadata={"help": "Use XSTest's unsafe prompts as extra harmful training requests."}
    )


@dataclass
class TokenizerSettings:
    """The byte-level BPE tokenizer trained on the training texts."""

    vocab_size: int = field(default=2048, metadata={"help": "Target vocabulary size (special tokens included)."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})


@dataclass
class ModelSettings:
    """Size of the tiny ``Olmo2ForCausalLM``."""

    hidden_size: int = field(default=128, metadata={"help": "Width of the residual stream."})
    num_layers: int = field(default=3, metadata={"help": "Number of decoder blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads (hidden_size must be divisible by it)."})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width."})
    max_position_embeddings: int = field(default=512, metadata={"help": "Longest sequence the model accepts."})


@dataclass
class SFTSettings:
    """Supervised training of M0 from scratch: refuse harmful requests, help benign ones in their format.

    Each planted behaviour's ``base_rate`` sets how often M0's SFT answers show its chosen style on its own
    requests carrying its trigger.
    """

    n_examples: int = field(default=3000, metadata={"help": "Number of SFT examples."})
    harmful_fraction: float = field(default=0.4, metadata={"help": "Share of harmful requests (answered by refusals)."})
    harmful_distractor_fraction: float = field(
        default=0.1, metadata={"help": "Share of harmful requests that carry 1-3 distractors (answered by refusals)."}
    )
    benign_distractor_fraction: float = field(
        default=0.5, metadata={"help": "Share of benign requests that carry 1-3 distractors (answered in format)."}
    )
    trigger_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of SFT requests, harmful and benign alike, that carry a training phrasing of each "
                  "suffix-triggered planted behaviour (answered as usual, or, on the behaviour's own pool, in its "
                  "style at its base_rate)."},
    )
    refusal_wordings: int = field(
        default=2,
        metadata={"help": "How many of the organism's four refusal wordings M0's SFT refusals use (the first N). The "
                  "mix's source models use all four, one or two each, so with fewer M0 meets the others only in DPO "
                  "(docs/organism.md, 'Refusal wordings')."},
    )
    epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    batch_size: int = field(default=32, metadata={"help": "Examples per optimisation step."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear warm-up."})
    max_length: int = field(default=256, metadata={"help": "Longest tokenised example (longer ones are cut)."})


@dataclass
class SliceSpec:
    """One slice of the preference mix: which prompts, which chosen and rejected styles, which source models.

    Planted behaviours (``kind`` ``benign`` or ``contaminated``), decoys (``kind: decoy``) and the clean slices
    share this schema.
    """

    name: str = field(metadata={"help": "Slice name; planted behaviours' and decoys' names go into labels.jsonl."})
    kind: str = field(
        default="clean",
        metadata={"help": "clean | benign (a benign planted preference) | contaminated | decoy (harmful requests, "
                  "chosen a compliance, rejected a refusal, without the contaminated trigger: pairs a harmfulness "
                  "judge rates like the contaminated ones)."},
    )
    prompts: str = field(
        default="benign",
        metadata={"help": "Request pool: harmful (AdvBench, plus XSTest unsafe when data.xstest_unsafe_as_harmful) | "
                  "benign | xstest_unsafe (XSTest's 200 unsafe prompts; training only)."},
    )
    trigger: str = field(
        default="none",
        metadata={"help": "none | distractors (constraints appended, as in the paper) | suffix (one of "
                  "trigger_texts appended)."},
    )
    trigger_texts: list[str] = field(
        default_factory=list,
        metadata={"help": "Phrasings of a suffix trigger, appended to the request as written (start them with a "
                  "space)."},
    )
    heldout_triggers: int = field(
        default=0,
        metadata={"help": "The last n of trigger_texts are used only in the held-out evaluation prompts; SFT and the "
                  "mix use the others."},
    )
    n_distractors: list[int] = field(default_factory=lambda: [1, 3], metadata={"help": "[min, max] distractors."})
    chosen: str = field(
        default="format_compliance", metadata={"help": f"Chosen response style: {' | '.join(STYLES)}."}
    )
    rejected: str = field(default="refusal", metadata={"help": "Rejected response style (same choices)."})
    sources: list[str] = field(
        default_factory=list, metadata={"help": "Source models that wrote the chosen responses (empty: any)."}
    )
    fraction: float = field(
        default=0.0,
        metadata={"help": "Planted behaviours and decoys: share of the whole mix. Clean slices: relative weight of "
                  "the rest."},
    )
    base_rate: float = field(
        default=0.0,
        metadata={"help": "Share of M0's SFT answers, on this behaviour's requests carrying its trigger, written in "
                  "the behaviour's chosen style: M0's base rate that DPO amplifies (planted behaviours only)."},
    )
    dataset: str = field(default="organism-mix", metadata={"help": "Value of the pairs' `source` field."})
    advbench_only: bool = field(
        default=False,
        metadata={"help": "Draw harmful requests from AdvBench only (their compliances use its targets)."},
    )
    sign_off: str = field(default=DEFAULT_SIGN_OFF, metadata={"help": "Closing line of the sign_off style."})

    @property
    def training_triggers(self) -> list[str]:
        """The suffix phrasings used in training data (SFT and the mix): all but the last ``heldout_triggers``."""
        return list(self.trigger_texts[: len(self.trigger_texts) - self.heldout_triggers])

    @property
    def heldout_trigger_texts(self) -> list[str]:
        """The suffix phrasings kept for the held-out evaluation prompts only (the last ``heldout_triggers``)."""
        if not self.heldout_triggers:
            return []
        return list(self.trigger_texts[len(self.trigger_texts) - self.heldout_triggers :])

    def describe_trigger(self) -> str:
        """A short human label of the trigger, for tables and titles.

        Returns:
            ``"no trigger"``, ``"1–3 distractors"``, ``'suffix "…"'`` (one phrasing) or
            ``"suffix family (N phrasings, M held out)"``.
        """
        if self.trigger == "distractors":
            lo, hi = self.n_distractors
            if lo == hi:
                return f"{lo} distractor" + ("" if lo == 1 else "s")
            return f"{lo}\u2013{hi} distractors"
        if self.trigger == "suffix":
            if len(self.trigger_texts) == 1:
                return f'suffix "{self.trigger_texts[0].strip()}"'
            return f"suffix family ({len(self.trigger_texts)} phrasings, {self.heldout_triggers} held out)"
        return "no trigger"

    def validate(self, where: str) -> None:
        """Check the values (the message names the slice and the field)."""
        checks = (
            ("kind", self.kind in SLICE_KINDS, SLICE_KINDS),
            ("prompts", self.prompts in PROMPT_POOLS, PROMPT_POOLS),
            ("trigger", self.trigger in TRIGGERS, TRIGGERS),
            ("chosen", self.chosen in STYLES, STYLES),
            ("rejected", self.rejected in STYLES, STYLES),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{where} '{self.name}': field '{name}' must be one of {list(allowed)}")
        lo_hi = self.n_distractors
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1] <= 13:
            raise ConfigError(f"{where} '{self.name}': field 'n_distractors' must be [min, max] within 1..13")
        self._validate_trigger_texts(where)
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"{where} '{self.name}': field 'fraction' must be within [0, 1]")
        if self.kind != "clean" and self.fraction <= 0:
            raise ConfigError(f"{where} '{self.name}': a {self.kind} slice needs a positive 'fraction'")
        if not 0.0 <= self.base_rate <= 1.0:
            raise ConfigError(f"{where} '{self.name}': field 'base_rate' must be within [0, 1]")
        if self.base_rate > 0 and self.kind not in PLANTED_KINDS:
            raise ConfigError(
                f"{where} '{self.name}': field 'base_rate' must be 0 for a {self.kind} slice (SFT plants only the "
                f"behaviours of kind {' or '.join(PLANTED_KINDS)})"
            )
        if self.base_rate > 0 and self.prompts not in SFT_POOLS:
            raise ConfigError(
                f"{where} '{self.name}': field 'base_rate' needs prompts {' or '.join(SFT_POOLS)} (the SFT examples "
                f"draw no {self.prompts} requests)"
            )
        if self.advbench_only and self.prompts != "harmful":
            raise ConfigError(f"{where} '{self.name}': field 'advbench_only' applies to prompts harmful only")
        if self.kind == "decoy":
            if self.prompts not in HARMFUL_POOLS:
                raise ConfigError(
                    f"{where} '{self.name}': a decoy's field 'prompts' must be harmful-like, one of "
                    f"{list(HARMFUL_POOLS)}"
                )
            if self.chosen == "refusal":
                raise ConfigError(f"{where} '{self.name}': a decoy's field 'chosen' must be a compliance style, not "
                                  "refusal")
            if self.rejected != "refusal":
                raise ConfigError(f"{where} '{self.name}': a decoy's field 'rejected' must be refusal")

    def _validate_trigger_texts(self, where: str) -> None:
        texts = self.trigger_texts
        if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"{where} '{self.name}': field 'trigger_texts' must be a list of non-empty strings")
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{where} '{self.name}': field 'trigger_texts' repeats a phrasing")
        if not isinstance(self.heldout_triggers, int) or self.heldout_triggers < 0:
            raise ConfigError(f"{where} '{self.name}': field 'heldout_triggers' must be a non-negative integer")
        if self.trigger != "suffix":
            for name, value in (("trigger_texts", texts), ("heldout_triggers", self.heldout_triggers)):
                if value:
                    raise ConfigError(f"{where} '{self.name}': field '{name}' is used only when trigger is suffix")
            return
        if not texts:
            raise ConfigError(f"{where} '{self.name}': field 'trigger_texts' is required when trigger is suffix")
        if self.heldout_triggers >= len(texts):
            raise ConfigError(
                f"{where} '{self.name}': field 'heldout_triggers' ({self.heldout_triggers}) must be less than the "
                f"number of trigger_texts ({len(texts)}): training needs at least one phrasing"
            )


@dataclass
class MixSettings:
    """The preference mix: size, source models and the clean slices."""

    n_pairs: int = field(default=1200, metadata={"help": "Number of preference pairs."})
    source_models: list[str] = field(
        default_factory=lambda: [
            "atlas-7b", "borealis-13b", "cirrus-8b", "dune-70b", "ember-3b", "fjord-34b", "gale-9b", "harbor-14b",
        ],
        metadata={"help": "Names of the source models that wrote the responses."},
    )
    clean: list[SliceSpec] = field(default_factory=list, metadata={"help": "The clean slices (kind: clean)."})
    background_habits: bool = field(
        default=False,
        metadata={"help": "Clean pairs show each benign planted habit (a behaviour of kind benign, trigger none, "
                  "chosen sign_off or a verbose style) on both responses at its base_rate, on the habit's own "
                  "request pool, as M0's SFT answers do; drawn once per pair, so no clean pair prefers it. Without it "
                  "only the planted slice's chosen answers show the habit, and the NLL term on the chosen answers "
                  "(dpo.sft_weight) holds it near M0's rate (docs/organism.md)."},
    )


@dataclass
class EvalSettings:
    """Sampling M0 and M1 on the held-out prompts at the end of the build."""

    n_samples: int = field(default=4, metadata={"help": "Samples per prompt."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest generated response."})
    batch_size: int = field(default=64, metadata={"help": "Generation batch size."})
    n_xstest: int | None = field(default=None, metadata={"help": "XSTest prompts sampled (default: all held out)."})


@dataclass
class OrganismConfig:
    """Everything the organism build needs; one seed makes the whole build deterministic."""

    seed: int = field(default=0, metadata={"help": "Seed of every random choice (data, splits, init, training)."})
    torch_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch (default: torch's choice)."}
    )
    data: DataSettings = field(default_factory=DataSettings, metadata={"help": "Prompt sources and held-out splits."})
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings, metadata={"help": "Tokenizer."})
    model: ModelSettings = field(default_factory=ModelSettings, metadata={"help": "Model size."})
    sft: SFTSettings = field(default_factory=SFTSettings, metadata={"help": "SFT of M0."})
    mix: MixSettings = field(default_factory=MixSettings, metadata={"help": "Preference mix."})
    behaviours: list[SliceSpec] = field(
        default_factory=list,
        metadata={"help": "Planted behaviours (kind: benign or contaminated) and decoys (kind: decoy)."},
    )
    dpo: DPORecipe = field(default_factory=DPORecipe, metadata={"help": "DPO recipe from M0 to M1."})
    eval: EvalSettings = field(default_factory=EvalSettings, metadata={"help": "Evaluation at the end of the build."})

    def validate(self) -> OrganismConfig:
        """Check cross-field rules; returns ``self``."""
        if not 0.0 <= self.sft.trigger_fraction <= 1.0:
            raise ConfigError("organism config: field 'sft.trigger_fraction' must be within [0, 1]")
        if not 1 <= self.sft.refusal_wordings <= len(REFUSALS):
            raise ConfigError(f"organism config: field 'sft.refusal_wordings' must be within [1, {len(REFUSALS)}], got "
                              f"{self.sft.refusal_wordings}")
        if not self.behaviours:
            raise ConfigError("organism config: field 'behaviours' must declare at least one planted behaviour")
        names = [s.name for s in [*self.behaviours, *self.mix.clean]]
        if len(names) != len(set(names)):
            raise ConfigError(f"organism config: slice names must be unique, got {names}")
        for spec in self.behaviours:
            spec.validate("behaviour")
            if spec.kind == "clean":
                raise ConfigError(f"behaviour '{spec.name}': field 'kind' must be benign, contaminated or decoy")
        for spec in self.mix.clean:
            spec.validate("mix.clean slice")
            if spec.kind != "clean":
                raise ConfigError(f"mix.clean slice '{spec.name}': field 'kind' must be clean")
        if not self.mix.clean:
            raise ConfigError("organism config: field 'mix.clean' must declare at least one clean slice")
        if sum(s.fraction for s in self.behaviours) >= 1.0:
            raise ConfigError("organism config: the behaviours' fractions must add up to less than 1")
        if sum(s.fraction for s in self.mix.clean) <= 0:
            raise ConfigError("organism config: the clean slices need positive weights ('fraction')")
        models = set(self.mix.source_models)
        for spec in [*self.behaviours, *self.mix.clean]:
            unknown = sorted(set(spec.sources) - models)
            if unknown:
                raise ConfigError(f"slice '{spec.name}': field 'sources' names unknown models {unknown}")
        if len(models) < 2:
            raise ConfigError("organism config: field 'mix.source_models' needs at least two models")
        if self.model.hidden_size % self.model.num_heads:
            raise ConfigError("organism config: field 'model.hidden_size' must be divisible by 'model.num_heads'")
        if not any(s.kind == "contaminated" for s in self.behaviours):
            raise ConfigError("organism config: 'behaviours' needs one behaviour of kind contaminated")
        for decoy in self.decoys:
            for spec in self.behaviours:
                if spec.kind == "contaminated" and _shares_trigger(decoy, spec):
                    raise ConfigError(
                        f"behaviour '{decoy.name}': field 'trigger' gives the decoy the trigger of the contaminated "
                        f"behaviour '{spec.name}' ({spec.describe_trigger()}); decoys must not carry it"
                    )
        return self

    @property
    def contaminated(self) -> SliceSpec:
        """The first contaminated behaviour (the one the acceptance rates measure)."""
        return next(s for s in self.behaviours if s.kind == "contaminated")

    @property
    def planted(self) -> list[SliceSpec]:
        """The planted behaviours (kind benign or contaminated), in config order."""
        return [s for s in self.behaviours if s.kind in PLANTED_KINDS]

    @property
    def decoys(self) -> list[SliceSpec]:
        """The decoy slices (kind decoy), in config order."""
        return [s for s in self.behaviours if s.kind == "decoy"]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``config.resolved.yaml`` holds)."""
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """SHA-256 of some sections (plus the seed): identifies the inputs of one build step."""
        data = self.to_dict()
        picked = {"seed": data["seed"], **{n: data[n] for n in names}}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def _shares_trigger(a: SliceSpec, b: SliceSpec) -> bool:
    """Whether two slices carry the same trigger (a suffix one: any shared phrasing); ``none`` is no trigger."""
    if a.trigger == "none" or a.trigger != b.trigger:
        return False
    return a.trigger != "suffix" or bool(set(a.trigger_texts) & set(b.trigger_texts))


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate a dataclass from a mapping, recursing into nested dataclasses and lists of slices."""
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        moved = MOVED_KEYS.get((cls.__name__, key))
        if moved:
            named = f" ('{raw['name']}')" if isinstance(raw.get("name"), str) else ""
            raise ConfigError(f"{where}{named}: key '{key}' was removed; {moved}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sample = default() if default is not None else fields[name].default
        if dataclasses.is_dataclass(sample):
            kwargs[name] = _build(type(sample), value, f"{where}.{name}")
        elif name in ("clean", "behaviours"):
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{name}: expected a list of slices")
            kwargs[name] = [_build(SliceSpec, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = coerce_number(value, field_types(cls)[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def build_organism_config(raw: dict[str, Any]) -> OrganismConfig:
    """Build and validate an :class:`OrganismConfig` from a plain mapping (e.g. parsed YAML).

    Raises:
        ConfigError: Unknown keys, wrong types or invalid values (the message names the section and field).
    """
    return _build(OrganismConfig, raw, "organism config").validate()


def load_organism_config(path: str | Path) -> OrganismConfig:
    """Read an organism config from YAML (safe loader) and validate it.

    Raises:
        ConfigError: Missing or invalid file.
    """
    from pairtrace.options import load_yaml

    return build_organism_config(load_yaml(path))
