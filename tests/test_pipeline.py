"""Planning the whole experiment from the shipped configs, and the Markdown tables of a results file."""

from __future__ import annotations

from pathlib import Path

from pairtrace.pipeline import plan_experiment, render_tables

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_dry_run_of_the_default_config_plans_the_paper_comparison():
    plan = plan_experiment(CONFIGS / "organism.yaml")
    assert plan["inputs"]["organism"] is True
    assert "baseline" in plan["retrains"] and any(r.startswith("gradient-switch") for r in plan["retrains"])


def test_render_tables_marks_missing_numbers_and_reductions():
    base = {"harmful": {"rate": 0.5, "ci": [0.4, 0.6]}, "harmful_no_trigger": None, "benign_helpfulness": None,
            "format_following": None, "over_refusal": None}
    row = {"name": "probe-filter-k8", "method": "probe", "action": "filter", "k": 8,
           "harmful": {"rate": 0.1, "ci": [0.0, 0.2]}, "reduction": 0.8}
    results = {"n_pairs": 100, "layer": 2, "headline_k": 8, "baseline": base, "interventions": [row],
               "cost": [{"method": "probe", "wall_s": 1.0, "wall_ratio": 1.0, "forward_passes": 10,
                         "backward_passes": 0, "flops_estimate": None}], "attribution_quality": {}}
    tables = render_tables(results)
    assert "| probe | filter | 10.0% [0.0%, 20.0%] | 80% |" in tables
    assert "| baseline retrain | none | 50.0% [40.0%, 60.0%] | |" in tables
    assert "n/a" in tables
