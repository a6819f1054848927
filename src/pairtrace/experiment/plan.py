"""The frozen plan of an experiment: which retrains run, at which k, on which DPO seeds.

One function builds it for the run (k values known from the data) and for ``--dry-run`` (k values given as shares
of the mix when the data size is not known yet), so the two always agree.

    plan = build_plan(config, n_pairs=1200, source_models=("fjord-34b",))
    for unit in plan.units: ...        # one retrain per (experiment, DPO seed)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pairtrace.errors import ConfigError
from pairtrace.experiment.run_config import RunConfig

SEED_SCOPES = ("headline", "all")
ACTIONS = ("filter", "switch")


@dataclass(frozen=True)
class Experiment:
    """One modification of the mix, retrained from M0 and evaluated.

    Attributes:
        name: Folder and stage name, e.g. ``probe-switch-k96``, ``baseline``, ``source-ablation``.
        method: Ranker name, ``sources`` (source ablation) or ``None`` (the baseline: the mix unchanged).
        action: ``filter`` or ``switch`` (``None`` for the baseline).
        k: How many pairs (``None`` for a source ablation, 0 for the baseline; a share such as ``"8%"`` in a
            plan made before the data size is known).
        models: Chosen models removed by a source ablation.
    """

    name: str
    method: str | None
    action: str | None
    k: int | str | None
    models: tuple[str, ...] = ()

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    @property
    def selected_by(self) -> str | None:
        """The stage whose output selects the pairs this experiment changes: ``rankings`` (a ranker's top-k),
        ``sources`` (a source ablation), or ``None`` (the baseline and a random selection, ready as soon as the
        pairs are)."""
        if self.method in (None, "random"):
            return None
        return "sources" if self.method == "sources" else "rankings"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models) or None
        return data


@dataclass(frozen=True)
class RetrainUnit:
    """One DPO retrain: an experiment on one seed. The first seed keeps the experiment's name."""

    experiment: Experiment
    seed: int
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.experiment.name if self.seed == self.seeds[0] else f"{self.experiment.name}-seed{self.seed}"


@dataclass(frozen=True)
class Plan:
    """Everything the run will retrain, fixed before the first retrain starts."""

    headline_k: int | str
    k_values: tuple[int | str, ...]
    experiments: tuple[Experiment, ...]
    units: tuple[RetrainUnit, ...]
    seeds: tuple[int, ...]
    recipe_seed: int
    source_ablation_pending: bool = field(default=False)

    def units_of(self, name: str) -> list[RetrainUnit]:
        """The retrains of one experiment, first seed first."""
        return [u for u in self.units if u.experiment.name == name]

    def describe(self) -> dict[str, Any]:
        """Plain data for ``--dry-run`` and ``results.json``."""
        return {
            "headline_k": self.headline_k,
            "k_values": list(self.k_values),
            "retrains": [e.name for e in self.experiments],
            "retrain_seeds": list(self.seeds),
            "n_retrains": len(self.units),
            "units": [u.name for u in self.units],
        }


def check_method_names(config: RunConfig) -> None:
    """Refuse ranker names that the registry does not know and unknown actions or seed scopes."""
    from pairtrace.experiment.rankers import RANKERS

    for section, key in (("attribution", "methods"), ("validation", "headline_methods"),
                         ("validation", "sweep_methods"), ("validation", "seeded_methods")):
        bad = sorted(set(getattr(getattr(config, section), key) or ()) - set(RANKERS))
        if bad:
            raise ConfigError(f"run config: {section}.{key} has unknown method(s) {bad}; known: {sorted(RANKERS)}")
    bad = sorted(set(config.validation.actions) - set(ACTIONS))
    if bad:
        raise ConfigError(f"run config: validation.actions has unknown action(s) {bad}; known: {list(ACTIONS)}")
    if config.validation.seed_scope not in SEED_SCOPES:
        raise ConfigError(f"run config: validation.seed_scope must be one of {list(SEED_SCOPES)}, "
                          f"got {config.validation.seed_scope!r}")


def resolve_k_values(config: RunConfig, n_pairs: int | None) -> tuple[int | str, list[int | str]]:
    """The headline k and the sorted k sweep (the headline included); shares of the mix (``"8%"``) where the
    data size is unknown."""
    v = config.validation

    def k_of(fraction: float) -> int | str:
        return round(fraction * n_pairs) if n_pairs is not None else f"{fraction:.0%}"

    headline = v.headline_k if v.headline_k is not None else k_of(v.headline_fraction)
    ks = list(v.k_values) if v.k_values is not None else [k_of(f) for f in v.sweep_fractions]
    values = {int(k) if not isinstance(k, str) else k for k in ks} | {headline}
    return headline, sorted(values, key=lambda k: (isinstance(k, str), float(str(k).rstrip("%"))))


def build_plan(config: RunConfig, n_pairs: int | None = None,
               source_models: tuple[str, ...] | None = None) -> Plan:
    """The experiments and retrain units of a run.

    Args:
        config: The run configuration.
        n_pairs: Size of the mix (``None`` before the data is read: k values become shares).
        source_models: Chosen models flagged by source enrichment (``None`` when not known yet: the source
            ablation is planned if enabled; empty: none flagged, no source ablation).

    Raises:
        ConfigError: Unknown methods, actions or seed scope, or invalid retrain seeds.
    """
    from pairtrace.retrain_seeds import check_retrain_seeds

    check_method_names(config)
    v = config.validation
    headline, k_values = resolve_k_values(config, n_pairs)
    available = set(config.attribution.methods)
    experiments = [Experiment("baseline", None, None, 0)]
    for method in (m for m in v.headline_methods if m in available):
        experiments += [Experiment(f"{method}-{a}-k{headline}", method, a, headline) for a in v.actions]
    for method in (m for m in v.sweep_methods if m in available):
        for k in k_values:
            if k != headline:
                experiments += [Experiment(f"{method}-{a}-k{k}", method, a, k) for a in v.actions]
    pending = v.source_ablation and source_models is None
    if v.source_ablation and (source_models or pending):
        experiments.append(Experiment("source-ablation", "sources", "filter", None, tuple(source_models or ())))
    recipe_seed = int(config.validation.recipe.seed)
    try:
        seeds = tuple(check_retrain_seeds(v.retrain_seeds)) if v.retrain_seeds is not None else (recipe_seed,)
    except ValueError as exc:
        raise ConfigError(f"run config: validation.retrain_seeds: {exc}") from exc
    units = []
    for exp in experiments:
        seeded = exp.k == headline and exp.method != "sources" and (
            v.seeded_methods is None or exp.method in v.seeded_methods)
        repeated = v.seed_scope == "all" or exp.is_baseline or seeded
        own = seeds if repeated else seeds[:1]
        units += [RetrainUnit(exp, seed, own) for seed in own]
    return Plan(headline_k=headline, k_values=tuple(k_values), experiments=tuple(experiments), units=tuple(units),
                seeds=seeds, recipe_seed=recipe_seed, source_ablation_pending=pending)
