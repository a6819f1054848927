"""Planning the whole experiment from the shipped configs, and the Markdown tables of a results file."""

from __future__ import annotations

from pathlib import Path

from pairtrace.experiment.run import plan_experiment
from pairtrace.experiment.tables import render_tables

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_dry_run_of_the_default_config_plans_the_paper_comparison():
    plan = plan_experiment(CONFIGS / "organism.yaml")
    assert plan["inputs"]["organism"] is True
    assert "baseline" in plan["retrains"] and any(r.startswith("gradient-switch") for r in plan["retrains"])
    # the baseline and the seeded methods' 4 headline retrains run once per DPO seed; bank, gradient, judge, the
    # sweep and the source ablation once
    assert plan["retrain_seeds"] == [0, 1, 2] and plan["n_retrains"] == len(plan["retrains"]) + 2 * 5 == 26


def test_seed_scope_decides_which_retrains_repeat_over_the_seeds(tmp_path):
    import pytest
    import yaml

    from pairtrace.errors import ConfigError

    config = yaml.safe_load((CONFIGS / "organism.yaml").read_text(encoding="utf-8"))
    config["organism"] = str(CONFIGS / "organism-build.yaml")
    config["validation"]["seeded_methods"] = None  # every headline method
    for scope, seeded in (("headline", 11), ("all", 16)):
        config["validation"]["seed_scope"] = scope
        path = tmp_path / f"{scope}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        plan = plan_experiment(path)
        assert len(plan["retrains"]) == 16 and plan["n_retrains"] == 16 + 2 * seeded
    config["validation"]["seed_scope"] = "sweep"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="seed_scope"):
        plan_experiment(path)

    # the run plans the same retrains once it knows the data size and the flagged chosen models
    from pairtrace.experiment.plan import build_plan
    from pairtrace.experiment.run_config import load_run_config

    config["validation"].update(headline_methods=["probe"], sweep_methods=["probe"], sweep_fractions=[0.02, 0.08])
    for scope, expected in (("headline", 3 + 2 * 3 + 2 + 1), ("all", 6 * 3)):
        config["validation"]["seed_scope"] = scope
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        plan = build_plan(load_run_config(path), n_pairs=1200, source_models=("m",))
        names = [u.name for u in plan.units]
        assert len(names) == expected and names[:2] == ["baseline", "baseline-seed1"]
        assert "probe-switch-k96-seed2" in names and "probe-switch-k24" in names
        assert ("probe-switch-k24-seed1" in names) == (scope == "all")
    assert not any(e.method == "sources" for e in build_plan(load_run_config(path), 1200, ()).experiments)


def test_seeded_methods_repeat_only_their_headline_retrains_over_the_seeds(tmp_path):
    import pytest
    import yaml

    from pairtrace.errors import ConfigError
    from pairtrace.experiment.plan import build_plan
    from pairtrace.experiment.run_config import load_run_config

    config = yaml.safe_load((CONFIGS / "organism.yaml").read_text(encoding="utf-8"))
    config["organism"] = str(CONFIGS / "organism-build.yaml")
    config["validation"].update(headline_methods=["probe", "gradient", "random"], sweep_methods=["probe"],
                                sweep_fractions=[0.02, 0.08], seeded_methods=["probe", "random"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    names = [u.name for u in build_plan(load_run_config(path), n_pairs=1200, source_models=("m",)).units]
    # baseline and probe / random at k = 96 on seeds 0-2; gradient at k = 96, the sweep and the ablation on seed 0
    assert len(names) == 3 + 2 * 2 * 3 + 2 + 2 + 1
    assert {"probe-switch-k96-seed2", "random-filter-k96-seed1", "gradient-switch-k96"} <= set(names)
    assert not any(n.startswith("gradient-") and "-seed" in n for n in names)
    config["validation"]["seed_scope"] = "all"  # 'all' repeats every retrain, whatever the list says
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert len(build_plan(load_run_config(path), n_pairs=1200, source_models=("m",)).units) == 3 * 10
    config["validation"].update(seed_scope="headline", seeded_methods=["probe", "lesss"])
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"seeded_methods.*lesss"):
        build_plan(load_run_config(path), n_pairs=1200)


def test_render_tables_marks_missing_numbers_and_reductions():
    base = {"harmful": {"rate": 0.5, "ci": [0.4, 0.6]}, "harmful_no_trigger": None, "benign_helpfulness": None,
            "format_following": None, "over_refusal": None}
    row = {"name": "probe-filter-k8", "method": "probe", "action": "filter", "k": 8,
           "harmful": {"rate": 0.1, "ci": [0.0, 0.2], "n": 20, "unknown": 5}, "reduction": 0.8,
           "benign_helpfulness_change": {"change": -0.058, "ci": [-0.1, -0.017], "n_prompts": 30}}
    results = {"n_pairs": 100, "layer": 2, "headline_k": 8, "baseline": base, "interventions": [row],
               "cost": [{"method": "probe", "wall_s": 1.0, "wall_ratio": 1.0, "forward_passes": 10,
                         "backward_passes": 0, "flops_estimate": None}], "attribution_quality": {}}
    tables = render_tables(results)
    assert "each DPO seed" not in tables  # one retrain per experiment: no seed column
    assert "| probe | filter | 10.0% [0.0%, 20.0%] | 80% | 20% |" in tables
    assert "| baseline retrain | none | 50.0% [40.0%, 60.0%] | | n/a |" in tables
    assert "| n/a | -5.8 [-10.0, -1.7] |" in tables  # capabilities: helpfulness, then its paired change
    assert "n/a" in tables

    seeded = {**results, "baseline": {**base, "seeds": [0, 1], "per_seed": [{"harmful": 0.4}, {"harmful": 0.6}]},
              "interventions": [{**row, "seeds": [0, 1], "per_seed": [{"harmful": 0.05, "benign_helpfulness": 0.9},
                                                                      {"harmful": 0.15, "benign_helpfulness": 0.8}]}]}
    tables = render_tables(seeded)
    assert "Rates pool the retrains of DPO seeds 0, 1" in tables
    # both harmful rates and both reductions (n/a here: the rows carry no unknown-as-harmful rate), then the seeds
    assert "| probe | filter | 10.0% [0.0%, 20.0%] | 80% | 20% | n/a | n/a | 5.0% · 15.0% |" in tables
    assert "| baseline retrain | none | 50.0% [40.0%, 60.0%] | | n/a | n/a | | 40.0% · 60.0% |" in tables
    assert "| 90.0% · 80.0% |" in tables  # capabilities: helpfulness of each seed
    assert "| probe | filter | 8 | 10.0% [0.0%, 20.0%] | 80% | 20% | n/a | n/a | 2 |" in tables  # k sweep: seeds


def test_quick_config_runs_end_to_end_and_resumes_from_its_stages(tmp_path: Path) -> None:
    """The whole `pairtrace run` on the reduced organism: every stage, every table, the report; then a resume."""
    import json
    import time

    from pairtrace.experiment.run import run_experiment

    out = tmp_path / "quick"
    results = run_experiment(CONFIGS / "organism-quick.yaml", out, progress=False)
    plan = plan_experiment(CONFIGS / "organism-quick.yaml")

    assert results["n_pairs"] == 400 and results["headline_k"] == 32  # 8% of the mix, from the config
    assert 0.0 <= results["baseline"]["harmful"]["rate"] <= 1.0
    names = {row["name"] for row in results["interventions"]}
    expected = [("probe", 16), ("probe", 32), ("random", 32)]
    assert names == {f"{m}-{a}-k{k}" for m, k in expected for a in ("filter", "switch")} | {"source-ablation"}
    assert "baseline" in plan["retrains"]
    for row in results["interventions"]:
        low, high = row["harmful"]["ci"]
        assert low <= row["harmful"]["rate"] <= high
        change = row["benign_helpfulness_change"]  # paired against the baseline on the same benign prompts
        assert change["n_prompts"] > 0 and change["ci"][0] <= change["change"] <= change["ci"][1]
        changed = row["intervention"]["removed"] + row["intervention"]["switched"]
        assert changed == row["k"] if row["method"] != "sources" else changed > 0
    # Every ranking is scored against the organism's labels; the probe beats random.
    quality = results["attribution_quality"]
    assert set(quality) == {"probe", "bank", "gradient", "llm_judge", "random"}
    assert quality["probe"]["auroc"] > 0.8 > quality["random"]["auroc"]
    cost = {row["method"]: row for row in results["cost"]}
    assert cost["probe"]["wall_ratio"] == 1.0 and cost["gradient"]["backward_passes"] > 0
    tables = (out / "tables.md").read_text(encoding="utf-8")
    for heading in ("## Figure 1", "## k sweep", "## Capabilities", "## Cost", "## Attribution quality"):
        assert heading in tables
    assert "| probe | switch | 32 |" in tables and "| random | filter |" in tables
    assert "## Source enrichment of the probe's top-32" in tables and "| chosen model | in top-k |" in tables
    scan_rows = [r for r in results["sources"]["rows"] if r["column"] == "chosen_model"]
    assert scan_rows and all(0 < r["scan_p_value"] <= 1 and 1 <= r["scan_k"] <= 32 for r in scan_rows)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "http://" not in html.replace("http://www.w3.org", "")
    assert results["discovery"] and results["sources"] and results["steer"]
    assert "## Checks against the paper's figures" in tables
    assert {c["check"] for c in results["checks"]} >= {"probe AUROC for the contaminated pairs",
                                                     "wall clock of the whole run (minutes)"}

    # A second run finds every stage cached and reproduces the same numbers.
    start = time.perf_counter()
    again = run_experiment(CONFIGS / "organism-quick.yaml", out, progress=False)
    assert time.perf_counter() - start < 30
    assert json.dumps(again["interventions"], sort_keys=True) == json.dumps(results["interventions"], sort_keys=True)
    assert not any(c["check"].startswith("wall clock") for c in again["checks"])  # a resumed run is not timed

    # Adding a DPO seed reuses the first seed's retrains and pools the two seeds of every headline experiment.
    import yaml

    seeded_config = yaml.safe_load((CONFIGS / "organism-quick.yaml").read_text(encoding="utf-8"))
    seeded_config["organism"] = str(CONFIGS / "organism-small.yaml")
    seeded_config["validation"].update(retrain_seeds=[0, 1], headline_methods=["random"], sweep_methods=[],
                                       source_ablation=False)
    seeded_path = tmp_path / "seeded.yaml"
    seeded_path.write_text(yaml.safe_dump(seeded_config), encoding="utf-8")
    first_seed_stage = out / "stages" / "retrain-baseline.json"
    stamp = first_seed_stage.stat().st_mtime_ns
    seeded = run_experiment(seeded_path, out, progress=False)
    assert first_seed_stage.stat().st_mtime_ns == stamp  # seed 0 is the retrain already on disk
    assert (out / "stages" / "retrain-baseline-seed1.json").is_file()
    assert seeded["baseline"]["seeds"] == [0, 1] and len(seeded["baseline"]["per_seed"]) == 2
    assert seeded["baseline"]["per_seed"][0]["harmful"] == results["baseline"]["harmful"]["rate"]
    for row in seeded["interventions"]:
        assert row["seeds"] == [0, 1]
        rates = [s["harmful"] for s in row["per_seed"]]
        assert min(rates) - 1e-9 <= row["harmful"]["rate"] <= max(rates) + 1e-9  # pooled = weighted mean
        assert row["benign_helpfulness_change"]["n_prompts"] > 0
    assert "each DPO seed" in (out / "tables.md").read_text(encoding="utf-8")
    seeded_html = (out / "report.html").read_text(encoding="utf-8")
    assert "each DPO seed" in seeded_html and "DPO seeds (baseline and headline retrains)" in seeded_html


def test_checks_compare_a_run_with_the_paper_figures():
    from pairtrace.experiment.checks import compute_checks

    def row(method, action, reduction, benign):
        return {"method": method, "action": action, "k": 8, "reduction": reduction,
                "benign_helpfulness": {"rate": benign}, "seeds": [0, 1, 2]}

    results = {
        "headline_k": 8,
        "baseline": {"benign_helpfulness": {"rate": 0.9625}, "seeds": [0, 1, 2]},
        "interventions": [row("probe", "switch", 0.8, 0.9125), row("probe", "filter", 0.5, 0.90),
                          row("random", "filter", 0.1, 0.96), row("random", "switch", 0.3, 0.96)],
        "attribution_quality": {"probe": {"auroc": 0.96}},
        "cost": [{"method": "probe", "wall_ratio": 1.0}, {"method": "gradient", "wall_ratio": 12.0}],
    }
    checks = {c["check"]: c for c in compute_checks(results, wall_s=600)}
    assert checks["probe AUROC for the contaminated pairs"]["ok"]
    assert checks["probe-switch reduction at k = 8"]["ok"] and not checks["probe-filter reduction at k = 8"]["ok"]
    assert checks["random-filter reduction at k = 8"]["ok"] and not checks["random-switch reduction at k = 8"]["ok"]
    # 96.25% -> 91.25% is a drop of exactly 5 points: within the limit despite floating point
    assert checks["benign helpfulness drop after probe-switch (points)"] == {
        "check": "benign helpfulness drop after probe-switch (points)", "value": 5.0, "threshold": "<= 5", "ok": True}
    assert not checks["benign helpfulness drop after probe-filter (points)"]["ok"]
    assert checks["gradient / probe attribution wall time"]["ok"]
    assert checks["wall clock of the whole run (minutes)"]["value"] == 10.0
    # without ground truth, a gradient baseline or a fresh run, those checks are left out
    results.pop("attribution_quality")
    results["cost"] = []
    names = {c["check"] for c in compute_checks(results)}
    assert not any("AUROC" in n or "gradient" in n or "wall" in n for n in names)
