"""Source enrichment: counts, hypergeometric p-values, ablation suggestions, written artifacts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pairtrace.attribute import build_ranking, save_ranking
from pairtrace.errors import ConfigError, DataError
from pairtrace.sources import (
    MISSING,
    compute_enrichment_across_k,
    compute_source_enrichment,
    run_sources,
    suggest_source_ablation,
)


def exact_tail(x: int, n_pop: int, n_succ: int, k: int) -> float:
    """P[X >= x] for a hypergeometric variable, by direct summation of binomial coefficients."""
    total = math.comb(n_pop, k)
    return sum(math.comb(n_succ, i) * math.comb(n_pop - n_succ, k - i) for i in range(x, min(n_succ, k) + 1)) / total


def planted_ranking(n: int = 60, n_bad: int = 8, n_nan: int = 0):
    """A ranking whose first ``n_bad`` pairs (best scores) were all chosen from model 'bad'."""
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(n)]
    scores = np.linspace(1.0, 0.0, n)
    chosen = ["bad"] * n_bad + [["good-a", "good-b"][i % 2] for i in range(n - n_bad)]
    rejected = list(rng.choice(["r1", "r2", "r3"], size=n))
    source = ["mix-a" if i % 3 else "mix-b" for i in range(n)]
    if n_nan:
        scores[-n_nan:] = np.nan
    meta = pd.DataFrame({"id": ids, "row": range(n), "source": source, "chosen_model": chosen,
                         "rejected_model": rejected})
    return build_ranking(ids, scores, {"method": "probe", "layer": 2}, pair_metadata=meta)


def test_planted_model_is_enriched_with_exact_hypergeometric_p():
    ranking = planted_ranking()
    table = compute_source_enrichment(ranking, k=10)
    bad = table[(table["column"] == "chosen_model") & (table["value"] == "bad")].iloc[0]
    assert bad["count_top"] == 8 and bad["count_all"] == 8
    assert bad["share_top"] == pytest.approx(0.8) and bad["share_all"] == pytest.approx(8 / 60)
    assert bad["enrichment"] == pytest.approx(0.8 / (8 / 60))
    assert bad["p_value"] == pytest.approx(exact_tail(8, 60, 8, 10), rel=1e-9)
    # best first: the planted model tops the table
    assert table.iloc[0]["value"] == "bad"
    assert list(table["enrichment"]) == sorted(table["enrichment"], reverse=True)
    good = table[(table["column"] == "chosen_model") & (table["value"] == "good-a")].iloc[0]
    assert good["p_value"] == pytest.approx(exact_tail(int(good["count_top"]), 60, 26, 10), rel=1e-9)
    # per column, counts add up to k and the population
    for _, sub in table.groupby("column"):
        assert sub["count_top"].sum() == 10 and sub["count_all"].sum() == 60
    assert (table["q_value"] >= table["p_value"] - 1e-15).all()
    # the scan: all 8 planted pairs lead the ranking, so its best slice is the top 8
    assert bad["scan_k"] == 8 and bad["scan_count"] == 8
    assert bad["scan_enrichment"] == pytest.approx(1.0 / (8 / 60))
    assert exact_tail(8, 60, 8, 8) <= bad["scan_p_value"] <= 10 * exact_tail(8, 60, 8, 8)
    assert (table["scan_q_value"] >= table["scan_p_value"] - 1e-15).all()


def test_scan_flags_a_model_that_the_wide_top_k_dilutes():
    n, k = 400, 200
    ids = [f"p{i}" for i in range(n)]
    # 'bad' fills 12 of the top 20, then appears at the background rate of the other five models
    chosen = ["bad" if i % 5 else "m0" for i in range(20)] + [f"m{i % 5}" if i % 6 else "bad" for i in range(n - 20)]
    meta = pd.DataFrame({"id": ids, "row": range(n), "source": ["mix"] * n, "chosen_model": chosen,
                         "rejected_model": ["r"] * n})
    ranking = build_ranking(ids, np.linspace(1.0, 0.0, n), {}, pair_metadata=meta)
    table = compute_source_enrichment(ranking, k, ("chosen_model",))
    bad = table[table["value"] == "bad"].iloc[0]
    assert bad["p_value"] > 0.01 > bad["scan_p_value"] and bad["scan_k"] <= 25
    assert suggest_source_ablation(table, statistic="fixed") == []
    assert suggest_source_ablation(table) == ["bad"]
    with pytest.raises(ConfigError, match="statistic"):
        suggest_source_ablation(table, statistic="best")


def test_suggestion_only_picks_significant_chosen_models():
    table = compute_source_enrichment(planted_ranking(), k=10)
    assert suggest_source_ablation(table) == ["bad"]
    assert suggest_source_ablation(table, min_enrichment=100.0) == []
    # a weak planting (2 of 10) is not significant at 0.01 in the top-10 ...
    weak = compute_source_enrichment(planted_ranking(n_bad=2), k=10)
    assert "bad" not in suggest_source_ablation(weak, statistic="fixed")
    # ... but the scan sees that the model's only two pairs are the top two
    assert "bad" in suggest_source_ablation(weak)


def test_unscored_pairs_are_not_in_the_population_and_k_is_clipped():
    ranking = planted_ranking(n=30, n_bad=4, n_nan=5)
    table = compute_source_enrichment(ranking, k=100)
    assert table.attrs["k"] == 25 and table.attrs["n_scored"] == 25
    for _, sub in table.groupby("column"):
        assert sub["count_all"].sum() == 25
    # with k = N every value has enrichment 1 and p = 1
    assert np.allclose(table["enrichment"], 1.0) and np.allclose(table["p_value"], 1.0)


def test_missing_metadata_is_labelled_and_empty_columns_are_skipped():
    ids = [f"p{i}" for i in range(6)]
    meta = pd.DataFrame({"id": ids, "row": range(6), "source": [None] * 6,
                         "chosen_model": ["a", None, "a", "b", None, "b"], "rejected_model": [None] * 6})
    ranking = build_ranking(ids, np.arange(6, 0, -1, dtype=float), {}, pair_metadata=meta)
    table = compute_source_enrichment(ranking, k=2)
    assert set(table["column"]) == {"chosen_model"}
    assert MISSING in set(table["value"])
    assert MISSING not in suggest_source_ablation(table, p_max=1.0, min_enrichment=0.0)


def test_bad_arguments_raise_user_errors():
    ranking = planted_ranking()
    with pytest.raises(ConfigError, match="k must be"):
        compute_source_enrichment(ranking, k=0)
    with pytest.raises(ConfigError, match="no column"):
        compute_source_enrichment(ranking, k=5, columns=("nope",))
    empty = build_ranking(["a", "b"], np.array([np.nan, np.nan]), {})
    with pytest.raises(DataError, match="no scored pair"):
        compute_source_enrichment(empty, k=1)


def test_run_sources_writes_all_artifacts(tmp_path):
    save_ranking(planted_ranking(), tmp_path / "rank")
    summary = run_sources(tmp_path / "rank", k=10, out_dir=tmp_path / "out")
    out = tmp_path / "out"
    assert summary["suggested_ablation"] == ["bad"]
    ablation = json.loads((out / "ablation.json").read_text())
    assert ablation["chosen_models"] == ["bad"] and ablation["k"] == 10
    on_disk = json.loads((out / "sources.json").read_text())
    assert on_disk["rows"][0]["value"] == "bad" and on_disk["n_scored"] == 60
    table = pd.read_parquet(out / "sources.parquet")
    assert len(table) == len(on_disk["rows"])
    assert (out / "sources.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_enrichment_across_k_matches_the_single_k_table():
    ranking = planted_ranking()
    by_k = compute_enrichment_across_k(ranking, [20, 5, 10, 10], top=2)
    assert [entry["k"] for entry in by_k] == [5, 10, 20]
    for entry in by_k:
        table = compute_source_enrichment(ranking, entry["k"], ("chosen_model",))
        bad = table[table["value"] == "bad"].iloc[0]
        first = entry["rows"][0]
        assert first["value"] == "bad" and len(entry["rows"]) == 2
        assert first["p_value"] == pytest.approx(bad["p_value"]) and first["count_top"] == min(8, entry["k"])
        assert entry["rows"][0]["p_value"] <= entry["rows"][1]["p_value"]


def test_run_sources_records_the_sweep(tmp_path):
    save_ranking(planted_ranking(), tmp_path / "rank")
    summary = run_sources(tmp_path / "rank", k=10, out_dir=tmp_path / "out", sweep_ks=[5, 10])
    on_disk = json.loads((tmp_path / "out" / "sources.json").read_text())
    assert [e["k"] for e in on_disk["by_k"]] == [5, 10] == [e["k"] for e in summary["by_k"]]
    assert on_disk["by_k"][1]["rows"][0]["p_value"] == pytest.approx(exact_tail(8, 60, 8, 10))


def test_command_line_writes_the_suggestion_of_the_chosen_statistic(tmp_path):
    from typer.testing import CliRunner

    from pairtrace.cli import app

    save_ranking(planted_ranking(n_bad=2), tmp_path / "rank")
    runner = CliRunner()
    for statistic, expected in (("scan", ["bad"]), ("fixed", [])):
        out = tmp_path / statistic
        result = runner.invoke(app, ["sources", str(tmp_path / "rank"), "--k", "10", "--out", str(out),
                                     "--statistic", statistic], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        ablation = json.loads((out / "ablation.json").read_text())
        assert ablation["chosen_models"] == expected
        assert ablation["criteria"]["statistic"] == ("scan_p_value" if statistic == "scan" else "p_value")
    result = runner.invoke(app, ["sources", str(tmp_path / "rank"), "--k", "10", "--out", str(tmp_path / "x"),
                                 "--statistic", "best"])
    assert result.exit_code != 0 and "statistic" in result.output
