"""benchmarks/robustness.py without training anything: the builds it plans (variant draws), the row it reads from
a run's results, and the aggregation and goal verdicts on synthetic rows."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pairtrace.errors import ConfigError
from pairtrace.organism.build_config import SliceSpec, build_organism_config
from testing_utils import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "organism-build.yaml"


@pytest.fixture(scope="module")
def robustness():
    with benchmark_module("robustness.py", "robustness_benchmark") as module:
        yield module


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return yaml.safe_load(BASE.read_text(encoding="utf-8"))


def _schema_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The slice with only the keys the current schema knows (``base_rate`` may not exist yet)."""
    known = {f.name for f in dataclasses.fields(SliceSpec)}
    return {k: v for k, v in spec.items() if k in known}


# ------------------------------------------------------------------------------------------------ the builds


def test_variant_draws_are_deterministic_and_valid(robustness, base) -> None:
    models = base["mix"]["source_models"]
    taken = {s["name"] for s in [*base["behaviours"], *base["mix"]["clean"]]}
    styles = set()
    for seed in range(30):
        extra = robustness.draw_variant_behaviour(base, seed)
        assert extra == robustness.draw_variant_behaviour(base, seed)
        styles.add((extra["chosen"], extra["rejected"]))
        assert (extra["kind"], extra["prompts"], extra["trigger"], extra["dataset"]) == (
            "benign", "benign", "none", "chat-helpful-mix")
        assert extra["base_rate"] == 0.1
        assert extra["fraction"] in robustness.VARIANT_FRACTIONS
        assert 1 <= len(extra["sources"]) <= 2 and set(extra["sources"]) <= set(models)
        assert extra["name"] not in taken
        if extra["chosen"] == "sign_off":
            assert extra["sign_off"] not in {b.get("sign_off") for b in base["behaviours"]}
        # valid against the slice schema, in a minimal organism config that does not depend on the YAML's state
        contaminated = {"name": "contaminated", "kind": "contaminated", "prompts": "harmful",
                        "trigger": "distractors", "fraction": 0.04}
        build_organism_config({"mix": {"clean": [{"name": "clean", "fraction": 1.0}]},
                               "behaviours": [contaminated, _schema_fields(extra)]})
    assert styles == {("verbose_after_opener", "format_compliance"), ("sign_off", "format_compliance"),
                      ("format_compliance", "terse")}
    assert robustness.draw_variant_behaviour(base, 0) != robustness.draw_variant_behaviour(base, 1)


def test_variant_styles_can_be_narrowed(robustness, base) -> None:
    assert {robustness.draw_variant_behaviour(base, seed, ["verbose"])["chosen"] for seed in range(10)} == {
        "verbose_after_opener"}
    with pytest.raises(ValueError, match="variant styles"):
        robustness.draw_variant_behaviour(base, 0, ["loud"])
    strong = robustness.draw_variant_behaviour(base, 0, fractions=[0.12], base_rate=0.2)
    assert (strong["fraction"], strong["base_rate"]) == (0.12, 0.2)
    builds = robustness.plan_builds(base, [], 3, 0, ["sign_off", "verbose"])
    assert {b.extra["chosen"] for b in builds} <= {"sign_off", "verbose_after_opener"}


def test_variants_build_on_the_seeds_they_are_given(robustness, base) -> None:
    assert [b.config["seed"] for b in robustness.plan_builds(base, [], 2, 0)] == [base["seed"], base["seed"] + 1]
    builds = robustness.plan_builds(base, [1], 2, 0, build_seeds=[0, 0])
    assert [b.config["seed"] for b in builds] == [1, 0, 0]
    with pytest.raises(ValueError, match="one organism seed per variant"):
        robustness.plan_builds(base, [1], 2, 0, build_seeds=[3])
    with pytest.raises(SystemExit):
        robustness.main(["--only-plan", "--variants", "2", "--variant-build-seeds", "3"])


def test_plan_builds_seeds_then_variants(robustness, base) -> None:
    before = copy.deepcopy(base)
    builds = robustness.plan_builds(base, [0, 3], 2, 7)
    assert base == before
    assert [b.name for b in builds] == ["seed0", "seed3", "variant7", "variant8"]
    assert [b.config["seed"] for b in builds] == [0, 3, 4, 5]  # each build its own SFT model
    assert builds[1].config["behaviours"] == base["behaviours"]
    for build, seed in zip(builds[2:], (7, 8), strict=True):
        assert build.config["behaviours"] == [*base["behaviours"], build.extra]
        assert build.extra == robustness.draw_variant_behaviour(base, seed)
    try:
        build_organism_config(copy.deepcopy(base))
    except ConfigError as exc:
        pytest.skip(f"the base YAML does not validate against the current schema: {exc}")
    for build in builds:
        config = copy.deepcopy(build.config)
        config["behaviours"] = [_schema_fields(b) for b in config["behaviours"]]
        build_organism_config(config)


def test_only_plan_runs_nothing(robustness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = robustness.main(["--only-plan", "--out", str(tmp_path / "out"), "--seeds", "0", "1", "--variants", "1"])
    printed = capsys.readouterr().out
    assert status in (0, 1)  # 1 when a config is invalid (it says so)
    assert "seed0" in printed and "seed1" in printed and "variant0" in printed and "retrain_seeds" in printed
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ one row


def _results(discovery: dict[str, Any] | None = None) -> dict[str, Any]:
    def intervention(method: str, action: str, reduction: float, help_rate: float) -> dict[str, Any]:
        return {"method": method, "action": action, "k": 96, "reduction": reduction,
                "benign_helpfulness": {"rate": help_rate}}

    return {
        "headline_k": 96, "n_pairs": 1200, "hardware": {"cpu": "Test CPU"},
        "baseline": {"benign_helpfulness": {"rate": 0.95}},
        "interventions": [intervention("probe", "filter", 0.9, 0.91), intervention("probe", "switch", 0.95, 0.93),
                          intervention("random", "filter", 0.1, 0.95), intervention("random", "switch", 0.05, 0.94),
                          {**intervention("probe", "filter", 0.5, 0.9), "k": 48}],
        "attribution_quality": {"probe": {"auroc": 0.97}, "llm_judge": {"auroc": 0.71}, "random": {"auroc": 0.5}},
        "discovery": discovery,
    }


def _view(tokens: int | None, behaviours: list[tuple[str, float, float]]) -> dict[str, Any]:
    return {"response_tokens": tokens, "labels": {"behaviours": [
        {"behaviour": b, "n_total": 48, "n_in_matrix": 48, "best_cluster": 1, "precision": p, "recall": r}
        for b, p, r in behaviours]}}


def test_build_row_reads_the_run(robustness, base) -> None:
    build = robustness.plan_builds(base, [0], 0, 0)[0]
    discovery = {**_view(4, [("distractor_compliance", 1.0, 1.0), ("sign_off", 0.5, 1.0)]),
                 "views": [_view(None, [("distractor_compliance", 0.6, 0.9), ("sign_off", 0.9, 0.85)])]}
    summary = {"acceptance": [{"check": "M1 benign help rate", "ok": True},
                              {"check": "build seconds", "ok": False}],
               "emergence": [{"behaviour": "distractor_compliance", "kind": "contaminated", "m0": 0.02, "m1": 0.8,
                              "emerged": True},
                             {"behaviour": "sign_off", "kind": "benign", "m0": 0.1, "m1": 0.7, "emerged": True}]}
    row = robustness.build_row(build, _results(discovery), summary)
    assert row["acceptance_ok"] is True and row["acceptance_not_counted"] == ["build seconds"]
    assert (row["probe_auroc"], row["llm_judge_auroc"], row["random_auroc"]) == (0.97, 0.71, 0.5)
    assert (row["probe_filter"], row["probe_switch"], row["random_filter"], row["random_switch"]) == (
        0.9, 0.95, 0.1, 0.05)
    assert row["help_drop_filter"] == pytest.approx(4.0) and row["help_drop_switch"] == pytest.approx(2.0)
    assert row["discovery"]["sign_off"]["best"] == {"view": "all", "purity": 0.9, "recall": 0.85,
                                                    "purity_without_decoys": None}  # no cluster make-up given
    assert len(row["discovery"]["distractor_compliance"]["views"]) == 2
    assert (row["discovery_purity"], row["discovery_recall"], row["discovery_ok"]) == (0.9, 0.85, True)
    timed = robustness.build_row(build, {**_results(discovery), "timings": {"organism": 0.2, "rankings": 3.0,
                                                                            "retrain-baseline": 100.0}},
                                 {**summary, "timings": {"data": 1.0, "m0": 400.0, "m1": 100.0, "eval": 50.0,
                                                         "total": 0.1, "reused_steps": ["m0"]}})
    assert timed["stage_s"] == pytest.approx(654.0)  # reused steps count with their own time; totals are not added

    # only the behaviours that emerged are judged; a missing emergence record counts every planted behaviour
    summary["emergence"][1]["emerged"] = False
    summary["acceptance"][0]["ok"] = False
    row = robustness.build_row(build, _results(discovery), summary)
    assert row["emerged"] == ["distractor_compliance"] and row["discovery_purity"] == 1.0
    assert row["acceptance_ok"] is False and row["acceptance_failed"] == ["M1 benign help rate"]
    row = robustness.build_row(build, _results(None), {})
    assert row["emergence_recorded"] is False and row["acceptance_ok"] is None
    assert row["emerged"] == [b["name"] for b in base["behaviours"] if b["kind"] in ("benign", "contaminated")]
    assert row["discovery_ok"] is False and row["discovery_purity"] is None


def test_discovery_purity_with_the_decoys_left_out(robustness, base) -> None:
    build = robustness.plan_builds(base, [0], 0, 0)[0]
    (decoy,) = [b["name"] for b in build.config["behaviours"] if b["kind"] == "decoy"]
    labels = {"behaviours": [{"behaviour": "distractor_compliance", "n_total": 60, "n_in_matrix": 60, "best_cluster": 2,
                              "precision": 50 / 64, "recall": 50 / 60}],
              "clusters": [{"cluster": 1, "n_labelled": 100, "behaviours": {"clean": 90, "distractor_compliance": 10}},
                           {"cluster": 2, "n_labelled": 64,
                            "behaviours": {"distractor_compliance": 50, decoy: 12, "clean": 2}}]}
    summary = {"acceptance": [], "emergence": [{"behaviour": "distractor_compliance", "kind": "contaminated",
                                                "m0": 0.02, "m1": 0.9, "emerged": True}]}
    row = robustness.build_row(build, _results({"response_tokens": 4, "labels": labels}), summary)
    best = row["discovery"]["distractor_compliance"]["best"]
    assert best["purity"] == pytest.approx(50 / 64) and best["purity_without_decoys"] == pytest.approx(50 / 52)
    assert row["discovery_ok"] is False and row["discovery_ok_without_decoys"] is True
    assert "78%/83% (96% without decoys)" in robustness._discovery_cell(row)
    line = robustness.discovery_without_decoys([row, {**row, "build": "b", "discovery_ok_without_decoys": False}])
    assert "1 of 2 builds meet 80% purity and 80% recall (seed0)" in line


# ------------------------------------------------------------------------------------------------ aggregation


def _row(name: str, **overrides: Any) -> dict[str, Any]:
    row = {"build": name, "acceptance_ok": True, "acceptance_failed": [], "probe_auroc": 0.97,
           "llm_judge_auroc": 0.7, "random_auroc": 0.5, "probe_filter": 0.9, "probe_switch": 0.93,
           "random_filter": 0.1, "random_switch": 0.05, "help_drop_filter": 3.0, "help_drop_switch": 2.0,
           "discovery_purity": 1.0, "discovery_recall": 0.95, "discovery_ok": True}
    return {**row, **overrides}


def _verdicts(goals: list[dict[str, Any]]) -> list[bool]:
    return [g["ok"] for g in goals]


def test_aggregation_and_goals_pass(robustness) -> None:
    rows = [_row("a", probe_auroc=0.99), _row("b", probe_auroc=0.96, random_switch=0.2), _row("c", probe_auroc=0.94),
            _row("d", discovery_ok=False, discovery_purity=0.5), _row("e", discovery_ok=None, discovery_purity=None),
            _row("f")]
    stats = robustness.summarise_builds(rows)
    assert stats["probe_auroc"]["median"] == pytest.approx(0.97)
    assert (stats["probe_auroc"]["worst"], stats["probe_auroc"]["worst_build"]) == (0.94, "c")
    assert (stats["random_switch"]["worst"], stats["random_switch"]["worst_build"]) == (0.2, "b")  # max is worse
    assert stats["probe_switch"]["worst"] == 0.93 and stats["help_drop_filter"]["worst"] == 3.0
    assert stats["discovery_purity"]["worst"] == 0.5 and stats["discovery_purity"]["missing"] == ["e"]
    goals = robustness.judge_goals(rows)
    assert len(goals) == 6 and all(_verdicts(goals)), goals
    # e has no emerged behaviour: left out of the share, so 4 of the other 5 pass (80%)
    assert goals[5]["detail"] == "4 of 5 builds (80%); failing: d; no emerged behaviour: e"


def test_goals_fail(robustness) -> None:
    rows = [_row("a"), _row("b", acceptance_ok=False, acceptance_failed=["M1 benign help rate"]),
            _row("c", probe_auroc=0.92, probe_switch=0.7), _row("d", probe_filter=None, discovery_ok=False),
            _row("e", random_filter=0.25, discovery_ok=False)]
    organism, auroc, switch, filter_, random_, discovery = robustness.judge_goals(rows)
    assert not any(_verdicts([organism, auroc, switch, filter_, random_, discovery]))
    assert organism["detail"] == "4 of 5 pass; failing: b (M1 benign help rate)"
    assert "worst 0.920 (c)" in auroc["detail"]
    assert "below: c" in switch["detail"] and "missing: d" in filter_["detail"]
    assert "at or above: e" in random_["detail"]  # the threshold is strict: 25% fails
    assert discovery["detail"].startswith("3 of 5 builds (60%)")
    assert not any(_verdicts(robustness.judge_goals([])))


def test_goal_numbers_near_their_bar_keep_a_decimal(robustness) -> None:
    rows = [_row("a", random_switch=0.2452, probe_filter=0.634), _row("b", random_filter=0.12)]
    random_ = robustness.judge_goals(rows)[4]
    assert random_["ok"] and "worst filter 12%, worst switch 24.5%" in random_["detail"]
    assert "worst 63.4% (a)" in robustness.judge_goals(rows)[3]["detail"]


def test_auroc_median_goal(robustness) -> None:
    rows = [_row("a", probe_auroc=0.95), _row("b", probe_auroc=0.95), _row("c", probe_auroc=0.99)]
    auroc = robustness.judge_goals(rows)[1]
    assert auroc["goal"].startswith("probe AUROC") and not auroc["ok"]
    assert auroc["detail"] == "median 0.950, worst 0.950 (a)"


def test_main_runs_every_build_and_writes_the_record(robustness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The whole script with the experiment replaced by canned results (one build raising)."""
    discovery = _view(4, [("distractor_compliance", 1.0, 1.0), ("sign_off", 0.9, 0.9)])
    calls = []

    def fake_run_build(organism_yaml: Path, run_dir: Path, seeds: list[int], methods: list[str]) -> dict[str, Any]:
        calls.append((yaml.safe_load(organism_yaml.read_text())["seed"], seeds, methods))
        if run_dir.name == "seed1":
            raise RuntimeError("boom")
        (run_dir / "organism").mkdir(parents=True)
        (run_dir / "organism" / "summary.json").write_text(
            '{"acceptance": [{"check": "M1 benign help rate", "ok": true}]}', encoding="utf-8")
        return _results(discovery)

    monkeypatch.setattr(robustness, "run_build", fake_run_build)
    out = tmp_path / "out"
    assert robustness.main(["--seeds", "0", "1", "--variants", "1", "--dpo-seeds", "3", "--out", str(out)]) == 0
    assert calls == [(0, [3], ["probe", "llm_judge", "random"]), (1, [3], ["probe", "llm_judge", "random"]),
                     (2, [3], ["probe", "llm_judge", "random"])]  # the variant: seed 2
    assert (out / "variant0" / "organism.yaml").is_file()
    record = yaml.safe_load((out / "robustness.json").read_text(encoding="utf-8"))
    assert [r["build"] for r in record["builds"]] == ["seed0", "seed1", "variant0"]
    assert record["builds"][1]["error"] == "RuntimeError: boom"
    assert record["summary"]["probe_auroc"]["n"] == 2 and record["all_goals_met"] is False
    printed = capsys.readouterr().out
    assert "FAILED: RuntimeError: boom" in printed and "FAIL" in printed and "robustness.json" in printed


def fake_worker(build: Any, out: Path, dpo_seeds: Any) -> dict[str, Any]:
    """A build's row without running it (importable by name in a spawned worker process)."""
    import os

    return {"build": build.name, "pid": os.getpid(), "seeds": list(dpo_seeds), "out": str(out)}


def test_run_builds_runs_builds_in_worker_processes(base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import os

    # imported by its own name, as when run as a script: a spawned worker must find the builds' class by name
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    robustness = importlib.import_module("robustness")
    builds = robustness.plan_builds(base, [0, 1, 2], 0, 0)
    rows = list(robustness.run_builds(builds, tmp_path, [5], jobs=2, worker=fake_worker))
    assert sorted(r["build"] for r in rows) == ["seed0", "seed1", "seed2"]
    assert all(r["pid"] != os.getpid() and r["seeds"] == [5] for r in rows)
    rows = list(robustness.run_builds(builds, tmp_path, [5], jobs=1, worker=fake_worker))
    assert [r["build"] for r in rows] == ["seed0", "seed1", "seed2"] and rows[0]["pid"] == os.getpid()
    monkeypatch.delitem(sys.modules, "robustness")  # imported for this test only


def test_main_keeps_plan_order_when_builds_finish_out_of_order(robustness, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def backwards(builds, out, dpo_seeds, jobs):
        seen["jobs"] = jobs
        for build in reversed(builds):
            yield robustness.failed_row(build, RuntimeError("not run")) | {"run_dir": str(out), "wall_s": 0.0}

    monkeypatch.setattr(robustness, "run_builds", backwards)
    out = tmp_path / "out"
    assert robustness.main(["--seeds", "0", "1", "--variants", "1", "--jobs", "2", "--out", str(out)]) == 0
    record = yaml.safe_load((out / "robustness.json").read_text(encoding="utf-8"))
    assert seen["jobs"] == 2 and [r["build"] for r in record["builds"]] == ["seed0", "seed1", "variant0"]
    with pytest.raises(SystemExit):
        robustness.main(["--jobs", "0", "--out", str(out)])


def dying_worker(build: Any, out: Path, dpo_seeds: Any) -> dict[str, Any]:
    """Kills its own worker process on one build (as the out-of-memory killer would)."""
    import os

    if build.name == "seed1":
        os._exit(1)
    return {"build": build.name}


def test_a_worker_process_that_dies_fails_its_build_not_the_benchmark(base, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    robustness = importlib.import_module("robustness")
    builds = robustness.plan_builds(base, [0, 1], 0, 0)
    rows = {r["build"]: r for r in robustness.run_builds(builds, tmp_path, [0], jobs=2, worker=dying_worker)}
    monkeypatch.delitem(sys.modules, "robustness")
    assert set(rows) == {"seed0", "seed1"} and "error" in rows["seed1"]
    assert rows["seed1"]["run_dir"] == str(tmp_path / "seed1")
