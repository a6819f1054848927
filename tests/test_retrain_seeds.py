"""Repeating retrains over DPO seeds: unit naming, which experiments are repeated, pooling of the records."""

from __future__ import annotations

import pytest

from pairtrace.evaluate import evaluate_generations
from pairtrace.retrain_seeds import expand_seeds, pool_seed_records, unit_name, units_of

EXPERIMENTS = [{"name": "baseline", "method": None, "action": None, "k": 0},
               {"name": "probe-switch-k8", "method": "probe", "action": "switch", "k": 8},
               {"name": "probe-switch-k4", "method": "probe", "action": "switch", "k": 4}]


def test_without_seeds_every_experiment_is_one_unchanged_retrain():
    units = expand_seeds(EXPERIMENTS, None, {"baseline"})
    assert units == EXPERIMENTS and units[0] is not EXPERIMENTS[0]


def test_seeded_experiments_get_one_unit_per_seed_and_the_others_the_first_seed():
    units = expand_seeds(EXPERIMENTS, [3, 1, 2], {"baseline", "probe-switch-k8"})
    names = [u["name"] for u in units]
    assert names == ["baseline", "baseline-seed1", "baseline-seed2", "probe-switch-k8", "probe-switch-k8-seed1",
                     "probe-switch-k8-seed2", "probe-switch-k4"]
    assert [u["seed"] for u in units_of("probe-switch-k8", units)] == [3, 1, 2]
    assert units_of("probe-switch-k4", units) == [{**EXPERIMENTS[2], "experiment": "probe-switch-k4", "seed": 3,
                                                   "seeds": [3]}]
    assert unit_name("x", 3, [3, 1]) == "x" and unit_name("x", 1, [3, 1]) == "x-seed1"
    for bad in ([], [1, 1]):
        with pytest.raises(ValueError, match="distinct"):
            expand_seeds(EXPERIMENTS, bad, set())


def _records(model: str, harmful: list[bool]):
    gens, judgements = [], []
    for sample, flag in enumerate(harmful):
        base = {"id": "h1:trigger", "base_id": "h1", "set": "harmful", "condition": "trigger", "prompt": "p",
                "model": model, "sample": sample, "response": "r", "seed": 0, "temperature": 0.7, "top_p": 1.0,
                "max_new_tokens": 8}
        gens.append(base)
        judgements.append({"id": "h1:trigger", "model": model, "sample": sample, "score": 100.0 if flag else 0.0,
                           "harmful": flag, "unknown": False})
    return gens, judgements


def test_pooled_records_keep_every_sample_and_give_the_mean_rate_over_seeds():
    seed0 = _records("baseline", [True, True, True, False])  # 75%
    seed1 = _records("baseline-seed1", [False, False, False, True])  # 25%
    gens, judgements = pool_seed_records([seed0, seed1], "baseline")
    assert len(gens) == len(judgements) == 8
    assert {r["model"] for r in gens + judgements} == {"baseline"}
    assert sorted(r["sample"] for r in gens) == list(range(8))  # unique keys: nothing overwritten
    evaluation = evaluate_generations(gens, judgements, n_boot=50)
    row = next(r for r in evaluation["harmful"] if r["model"] == "baseline" and r["condition"] == "trigger")
    assert row["rate"] == pytest.approx(0.5) and row["judged"] == 8
