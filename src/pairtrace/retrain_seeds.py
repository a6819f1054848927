"""Repeating a retrain over DPO seeds, and pooling the seeds' evaluations into one result.

One DPO retrain of a small model is a noisy measurement: the same data and recipe with another seed (data order,
dropout) can move a harmful rate by tens of points and benign helpfulness by several. ``validation.retrain_seeds``
retrains the baseline and every headline intervention once per seed; the evaluation of an experiment then pools
the samples of all its seeds, so its rate is that of all their judged samples together (the mean over seeds when
each seed has as many) and its bootstrap interval (which resamples prompts) sees every seed's answers to a drawn
prompt. The interval does not resample seeds (a handful is too few), so each seed's own rate is reported beside the
pooled one: their spread is what retraining adds.

Naming: the first seed keeps the experiment's own name (``probe-switch-k96``), later ones add the seed
(``probe-switch-k96-seed1``); each is a separate retrain folder and stage, cached and resumable like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def unit_name(name: str, seed: int, seeds: Sequence[int]) -> str:
    """Folder and stage name of one seed of an experiment: the first seed keeps the plain name."""
    return name if seed == seeds[0] else f"{name}-seed{seed}"


def check_retrain_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as integers.

    Raises:
        ValueError: ``seeds`` is empty or repeats a seed.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"retrain seeds must be distinct and at least one, got {seeds}")
    return seeds


def expand_seeds(experiments: Iterable[dict[str, Any]], seeds: Sequence[int] | None,
                 seeded: set[str]) -> list[dict[str, Any]]:
    """One retrain unit per (experiment, seed).

    Args:
        experiments: Planned experiments (dicts with ``name``).
        seeds: DPO seeds; ``None`` leaves every experiment as it is (one retrain with the recipe's seed).
        seeded: Names of the experiments repeated over the seeds; the others run once, with the first seed.

    Returns:
        The units: copies of the experiments with ``seed``, ``seeds`` (all seeds of that experiment) and
        ``experiment`` (the experiment's name) added, and ``name`` made unique per seed.

    Raises:
        ValueError: ``seeds`` is empty or repeats a seed.
    """
    if seeds is None:
        return [dict(exp) for exp in experiments]
    seeds = check_retrain_seeds(seeds)
    units = []
    for exp in experiments:
        own = seeds if exp["name"] in seeded else seeds[:1]
        for seed in own:
            units.append({**exp, "name": unit_name(exp["name"], seed, own), "experiment": exp["name"],
                          "seed": seed, "seeds": own})
    return units


def units_of(name: str, units: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The units of one experiment, first seed first."""
    return [u for u in units if u.get("experiment", u["name"]) == name]


def pool_seed_records(per_seed: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
                      model: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Merge the generations and judgements of several seeds into those of one model.

    Samples are renumbered so that every (prompt id, model, sample) key stays unique: seed i's sample s becomes
    ``i * n + s`` with ``n`` one more than the largest sample index of any seed.

    Args:
        per_seed: ``(generations, judgements)`` of each seed, in seed order.
        model: The model name the pooled records carry (the experiment's name).

    Returns:
        ``(generations, judgements)`` of the pooled model.
    """
    width = 1 + max((int(r["sample"]) for gens, _ in per_seed for r in gens), default=-1)
    pooled_gens: list[dict[str, Any]] = []
    pooled_judgements: list[dict[str, Any]] = []
    for i, (gens, judgements) in enumerate(per_seed):
        for records, out in ((gens, pooled_gens), (judgements, pooled_judgements)):
            out.extend({**r, "model": model, "sample": i * width + int(r["sample"])} for r in records)
    return pooled_gens, pooled_judgements
