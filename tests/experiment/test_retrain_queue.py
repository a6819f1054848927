"""The retrain queue: with worker processes, the retrains that need no ranking (the baseline, random selections)
start before the rankings exist, discovery and steering run while the ranked ones train, and every retrain that
finished is cached whatever stops the run. Worker processes are replaced by threads here (the fixture's stages
are recorders); test_run.py runs the real ones."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any

import pytest
import yaml

from pairtrace.experiment import run as run_module
from pairtrace.experiment import validation
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.inputs import resolve_inputs
from pairtrace.experiment.run_config import load_run_config

EARLY = {"retrain-baseline", "retrain-random-filter-k1", "retrain-random-switch-k1"}
RANKED = {"retrain-probe-filter-k1", "retrain-probe-switch-k1"}


@pytest.fixture
def threaded(local_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The fixture's run with two workers, as threads that record which unit they retrained."""
    config = yaml.safe_load(local_run["config"].read_text(encoding="utf-8"))
    config["validation"]["parallel_retrains"] = 2
    local_run["config"].write_text(yaml.safe_dump(config), encoding="utf-8")
    started: dict[str, threading.Event] = {name: threading.Event() for name in EARLY | RANKED}
    failing: set[str] = set()

    def fake_worker(state: dict[str, Any], unit: Any) -> tuple[dict[str, Any], float]:
        name = f"retrain-{unit.name}"
        started[name].set()
        local_run["ran"].append(name)
        if name in failing:
            raise RuntimeError(f"{name} failed")
        return {"unit": unit.name}, 0.1

    monkeypatch.setattr(validation, "_retrain_worker", fake_worker)
    monkeypatch.setattr(validation.RetrainQueue, "_worker_pool",
                        lambda self: self._pool or setattr(self, "_pool", cf.ThreadPoolExecutor(2)) or self._pool)
    return {**local_run, "started": started, "failing": failing}


def _execute(run: dict[str, Any]) -> dict[str, Any]:
    run["ran"].clear()
    return run_module.execute(RunContext(load_run_config(run["config"]), run["out"], progress=False))


def _stamped(run: dict[str, Any]) -> set[str]:
    return {p.stem for p in (run["out"] / "stages").glob("retrain-*.json")}


def test_retrains_without_a_ranking_start_before_the_rankings_exist(threaded: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen_by_rankings: dict[str, bool] = {}

    def rank_pairs(ctx: Any, triples: Any) -> dict[str, Any]:
        for name in EARLY:  # the early retrains run while this stage does
            seen_by_rankings[name] = threaded["started"][name].wait(timeout=10)
        seen_by_rankings.update({name: threaded["started"][name].is_set() for name in RANKED})
        threaded["ran"].append("rankings")
        return {"n_pairs": 1, "layer": 1, "rankings": {}}

    monkeypatch.setattr(run_module, "rank_pairs", rank_pairs)
    collected: dict[str, Any] = {}
    monkeypatch.setattr(run_module, "collect_results",
                        lambda ctx, plan, rankings, quality, sources, outcomes, *rest: collected.update(outcomes)
                        or {"headline_k": 1, "interventions": [], "baseline": {}})
    _execute(threaded)
    assert seen_by_rankings == {**dict.fromkeys(EARLY, True), **dict.fromkeys(RANKED, False)}
    assert collected == {name.removeprefix("retrain-"): {"unit": name.removeprefix("retrain-")}
                         for name in EARLY | RANKED}
    assert _stamped(threaded) == EARLY | RANKED
    assert _execute(threaded)["checks"] is not None and threaded["ran"] == []  # all cached now


def test_a_failed_ranking_keeps_the_retrains_that_finished(threaded: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_rankings(ctx: Any, triples: Any) -> dict[str, Any]:
        for name in EARLY:
            threaded["started"][name].wait(timeout=10)
        raise RuntimeError("rankings broke")

    monkeypatch.setattr(run_module, "rank_pairs", broken_rankings)
    with pytest.raises(RuntimeError, match="rankings broke"):
        _execute(threaded)
    assert _stamped(threaded) == EARLY  # recorded although the run stopped before collecting them

    monkeypatch.setattr(run_module, "rank_pairs", lambda ctx, triples: {"n_pairs": 1, "layer": 1, "rankings": {}})
    _execute(threaded)
    assert set(threaded["ran"]) == RANKED | {"discover", "steer"}  # the stages before the rankings are cached too


def test_a_failed_retrain_stops_the_run_and_the_others_stay_cached(threaded: dict[str, Any]) -> None:
    threaded["failing"].add("retrain-probe-switch-k1")
    with pytest.raises(RuntimeError, match="retrain-probe-switch-k1 failed"):
        _execute(threaded)
    assert _stamped(threaded) == (EARLY | RANKED) - {"retrain-probe-switch-k1"}
    threaded["failing"].clear()
    _execute(threaded)
    assert [name for name in threaded["ran"] if name.startswith("retrain-")] == ["retrain-probe-switch-k1"]


def test_one_worker_runs_the_units_in_process_in_submission_order(local_run: dict[str, Any]) -> None:
    _execute(local_run)
    retrains = [name for name in local_run["ran"] if name.startswith("retrain-")]
    assert retrains == ["retrain-baseline", "retrain-random-filter-k1", "retrain-random-switch-k1",
                        "retrain-probe-filter-k1", "retrain-probe-switch-k1"]
    assert local_run["ran"].index("discover") < local_run["ran"].index("retrain-baseline")


def test_a_unit_submitted_twice_with_other_inputs_is_refused(local_run: dict[str, Any]) -> None:
    ctx = RunContext(load_run_config(local_run["config"]), local_run["out"], progress=False)
    unit = run_module.build_plan(ctx.config, n_pairs=1).units[0]
    with validation.RetrainQueue(ctx, workers=1) as queue:
        queue.submit([unit], {unit.name: "a"})
        queue.submit([unit], {unit.name: "a"})  # the same inputs: skipped
        with pytest.raises(ValueError, match="submitted twice"):
            queue.submit([unit], {unit.name: "b"})


def test_unit_key_needs_the_stage_that_selects_the_pairs(local_run: dict[str, Any]) -> None:
    ctx = RunContext(load_run_config(local_run["config"]), local_run["out"], progress=False)
    resolve_inputs(ctx)
    units = {u.name: u for u in run_module.build_plan(ctx.config, n_pairs=1).units}
    assert validation.unit_key(ctx, units["baseline"], None, None)
    assert validation.unit_key(ctx, units["random-switch-k1"], None, None)
    with pytest.raises(ValueError, match="rankings stage"):
        validation.unit_key(ctx, units["probe-switch-k1"], None, None)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Workers that record when each retrain starts and ends; the baseline takes a while."""
    recorded: list[tuple[str, str]] = []

    def slow_first(state: dict[str, Any], unit: Any) -> tuple[dict[str, Any], float]:
        recorded.append(("start", unit.name))
        if unit.name == "baseline":
            time.sleep(0.3)  # the main process reaches results() meanwhile and allows two at once
        recorded.append(("end", unit.name))
        return {"unit": unit.name}, 0.1

    monkeypatch.setattr(validation, "_retrain_worker", slow_first)
    return recorded


def test_the_first_retrain_runs_alone_so_one_pass_fills_the_reference_cache(
        threaded: dict[str, Any], events: list[tuple[str, str]]) -> None:
    _execute(threaded)
    assert events[:2] == [("start", "baseline"), ("end", "baseline")]
    assert {name for kind, name in events if kind == "end"} == {n.removeprefix("retrain-") for n in EARLY | RANKED}


def test_without_overlap_every_stage_waits_for_the_one_before(threaded: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load(threaded["config"].read_text(encoding="utf-8"))
    config["validation"]["overlap"] = False
    threaded["config"].write_text(yaml.safe_dump(config), encoding="utf-8")
    started_at_rankings: list[bool] = []

    def rank_pairs(ctx: Any, triples: Any) -> dict[str, Any]:
        started_at_rankings.append(any(event.is_set() for event in threaded["started"].values()))
        threaded["ran"].append("rankings")
        return {"n_pairs": 1, "layer": 1, "rankings": {}}

    monkeypatch.setattr(run_module, "rank_pairs", rank_pairs)
    _execute(threaded)
    assert started_at_rankings == [False]
    ran = threaded["ran"]
    assert set(ran[ran.index("rankings") + 1:ran.index("discover")]) == EARLY | RANKED
    assert ran[ran.index("rankings") + 1] == "retrain-baseline"  # the plan's order


def test_with_the_reference_cache_filled_the_first_retrain_does_not_wait(
        threaded: dict[str, Any], events: list[tuple[str, str]]) -> None:
    ctx = RunContext(load_run_config(threaded["config"]), threaded["out"], progress=False)
    resolve_inputs(ctx)
    units = run_module.build_plan(ctx.config, n_pairs=1).units[:2]
    with validation.RetrainQueue(ctx, workers=2, reference_cached=True) as queue:
        queue.submit(units, {u.name: validation.unit_key(ctx, u, "r", None) for u in units})
        queue.results()
    assert events[:2] == [("start", units[0].name), ("start", units[1].name)]


def test_the_organism_fills_the_reference_cache_when_the_recipes_tokenise_alike() -> None:
    from pathlib import Path

    config = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "organism.yaml")
    assert run_module.organism_filled_reference_cache(config)
    config.validation.recipe.max_length = config.organism.dpo.max_length // 2
    assert not run_module.organism_filled_reference_cache(config)
