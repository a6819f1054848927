"""Model-level (source) attribution: which sources and generating models are over-represented in the top-k.

For every value of a metadata column (``chosen_model``, ``rejected_model``, ``source``) of a ranking:

    N = scored pairs (the population the top-k is drawn from; unscored pairs can never be drawn)
    K = scored pairs with that value            k = top-k size            x = pairs with that value in the top-k
    enrichment = (x / k) / (K / N)              p = P[X >= x], X ~ Hypergeometric(N, K, k) = hypergeom.sf(x-1, N, K, k)

and, because nobody knows in advance how many pairs are bad, a scan over the top slices of size 1..k: the slice
where the value is most over-represented (``scan_k``, ``scan_enrichment``) and the minimum-hypergeometric p-value
(``scan_p_value``, :func:`pairtrace.stats.min_hypergeometric_test`), exact for having picked the best slice. A source
whose bad pairs fill the top 40 of a top 96 is diluted at k = 96 but stands out in the scan.

A chosen model that is strongly enriched among the most behaviour-like pairs is a candidate for source ablation:
retraining without every pair whose chosen response came from that model (paper: four flagged models, −85%).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, hypergeom

from pairtrace import __version__
from pairtrace.attribute import Ranking, load_ranking
from pairtrace.errors import ConfigError, DataError
from pairtrace.records import atomic_path, write_json_atomic
from pairtrace.stats import min_hypergeometric_test

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("chosen_model", "rejected_model", "source")
MISSING = "(missing)"
"""Label of pairs whose metadata column is empty."""
ENRICHMENT_COLUMNS = ("column", "value", "count_top", "share_top", "count_all", "share_all", "enrichment",
                      "p_value", "scan_k", "scan_count", "scan_enrichment", "scan_p_value", "q_value", "scan_q_value")
STATISTICS = ("scan", "fixed")
"""Tests an ablation suggestion can rest on: the scan over top slices (default) or the fixed top-k."""


def compute_source_enrichment(ranking: Ranking, k: int,
                              columns: Sequence[str] = DEFAULT_COLUMNS) -> pd.DataFrame:
    """Enrichment of each metadata value among the top-k pairs of a ranking, with a hypergeometric p-value.

    Args:
        ranking: A ranking (``table`` with the metadata columns, best-first).
        k: Size of the top set (clipped to the number of scored pairs).
        columns: Metadata columns to test; a column that is empty for every pair is skipped.

    Returns:
        One row per (column, value): ``count_top``, ``share_top``, ``count_all``, ``share_all``, ``enrichment``,
        ``p_value`` (one-sided, over-representation), the scan over slices 1..k (``scan_k``, ``scan_count``,
        ``scan_enrichment``, ``scan_p_value``) and Benjamini–Hochberg ``q_value`` / ``scan_q_value`` over all rows,
        sorted by enrichment (high first), then p-value (low first). Missing values are reported as
        :data:`MISSING`.

    Raises:
        ConfigError: ``k`` below 1 or a column the ranking does not have.
        DataError: The ranking has no scored pair.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    table = ranking.table
    unknown = [c for c in columns if c not in table.columns]
    if unknown:
        raise ConfigError(f"ranking has no column(s) {unknown}; available: {list(table.columns)}")
    scored = table[table["score"].notna()]
    n_pop = len(scored)
    if n_pop == 0:
        raise DataError("ranking has no scored pair: every datapoint vector was zero or non-finite")
    if k > n_pop:
        logger.warning("k=%d exceeds the %d scored pairs; using k=%d", k, n_pop, n_pop)
        k = n_pop
    top = scored.head(k)
    rows = []
    for column in columns:
        if scored[column].isna().all():
            logger.info("column '%s' is empty for every pair; skipped", column)
            continue
        everywhere = scored[column].astype(object).where(scored[column].notna(), MISSING).astype(str)
        in_top = everywhere.iloc[:k]
        count_all = everywhere.value_counts()
        count_top = in_top.value_counts()
        for value, n_value in count_all.items():
            x = int(count_top.get(value, 0))
            share_top, share_all = x / k, int(n_value) / n_pop
            scan = min_hypergeometric_test((everywhere == value).to_numpy(), k)
            rows.append({
                "column": column,
                "value": value,
                "count_top": x,
                "share_top": share_top,
                "count_all": int(n_value),
                "share_all": share_all,
                "enrichment": share_top / share_all,
                "p_value": float(hypergeom.sf(x - 1, n_pop, int(n_value), k)),
                "scan_k": scan.best_k,
                "scan_count": scan.best_count,
                "scan_enrichment": (scan.best_count / scan.best_k) / share_all if scan.best_k else math.nan,
                "scan_p_value": scan.p_value,
            })
    frame = pd.DataFrame(rows, columns=[c for c in ENRICHMENT_COLUMNS if not c.endswith("q_value")])
    for stat in ("p_value", "scan_p_value"):
        frame[stat] = frame[stat].clip(lower=0.0, upper=1.0)
        q_values = false_discovery_control(frame[stat].to_numpy()) if len(frame) else []
        frame[stat.replace("p_value", "q_value")] = q_values
    frame = frame.sort_values(["enrichment", "p_value", "column", "value"], ascending=[False, True, True, True],
                              kind="stable").reset_index(drop=True)
    frame.attrs.update({"k": k, "n_scored": n_pop, "n_pairs": len(table), "top_ids": top["id"].tolist()})
    return frame


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ConfigError(f"statistic must be one of {list(STATISTICS)}, got {statistic!r}")


def suggest_source_ablation(enrichment: pd.DataFrame, p_max: float = 0.01, min_enrichment: float = 2.0,
                            use_q_value: bool = False, statistic: str = "scan") -> list[str]:
    """Chosen models to drop in a source-ablation retrain: significantly and strongly enriched at the top.

    Args:
        enrichment: Output of :func:`compute_source_enrichment`.
        p_max: Largest p-value (or q-value) accepted.
        min_enrichment: Smallest enrichment accepted.
        use_q_value: Test the Benjamini–Hochberg q-value instead of the raw p-value.
        statistic: ``"scan"``: the scan's p-value and the enrichment of its best slice (no need to know how many
            pairs are bad); ``"fixed"``: the p-value and enrichment of the top-k itself.

    Returns:
        Chosen-model names, most enriched in the top-k first (never the :data:`MISSING` label).

    Raises:
        ConfigError: An unknown ``statistic``.
    """
    _check_statistic(statistic)
    if enrichment.empty:
        return []
    prefix = "scan_" if statistic == "scan" else ""
    stat = f"{prefix}q_value" if use_q_value else f"{prefix}p_value"
    keep = enrichment[(enrichment["column"] == "chosen_model") & (enrichment[stat] <= p_max)
                      & (enrichment[f"{prefix}enrichment"] >= min_enrichment) & (enrichment["value"] != MISSING)]
    return keep["value"].astype(str).tolist()


def compute_enrichment_across_k(ranking: Ranking, ks: Sequence[int], column: str = "chosen_model",
                                top: int = 3) -> list[dict]:
    """The values of one column with the lowest p-values at each of several top-k sizes: is the finding stable?

    Args:
        ranking: A ranking with ``column``.
        ks: Top-set sizes (e.g. the run's k sweep).
        column: Metadata column to test.
        top: Values kept per k, lowest p-value first.

    Returns:
        One record per k (ascending): ``{"k", "rows": [{"value", "count_top", "enrichment", "p_value"}, ...]}``.
    """
    out = []
    for k in sorted(set(int(k) for k in ks)):
        frame = compute_source_enrichment(ranking, k, (column,))
        frame = frame[frame["value"] != MISSING].sort_values(["p_value", "enrichment"], ascending=[True, False],
                                                              kind="stable").head(top)
        rows = [{key: _json_ready(rec[key]) for key in ("value", "count_top", "enrichment", "p_value")}
                for rec in frame.to_dict(orient="records")]
        out.append({"k": int(frame.attrs.get("k", k)), "column": column, "rows": rows})
    return out


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def run_sources(ranking_path: str | Path, k: int, out_dir: str | Path,
                columns: Sequence[str] = DEFAULT_COLUMNS, p_max: float = 0.01,
                min_enrichment: float = 2.0, sweep_ks: Sequence[int] = (), statistic: str = "scan") -> dict:
    """Compute source enrichment for a saved ranking and write its artifacts.

    Writes into ``out_dir``: ``sources.parquet`` (the enrichment table), ``sources.json`` (settings, counts and
    the table as records), ``ablation.json`` (``{"chosen_models": [...], "criteria": {...}}``, the input of a
    source-ablation intervention) and ``sources.png`` (bar chart).

    Args:
        ranking_path: A ranking Parquet file or the directory holding ``ranking.parquet``.
        k: Size of the top set.
        out_dir: Output directory (created).
        columns: Metadata columns to test.
        p_max: Largest p-value for an ablation suggestion.
        min_enrichment: Smallest enrichment for an ablation suggestion.
        sweep_ks: Other top-set sizes at which the chosen models are also tested (``"by_k"`` in the summary).
        statistic: Test behind the ablation suggestion: ``"scan"`` (best top slice up to k) or ``"fixed"`` (the
            top-k); see :func:`suggest_source_ablation`.

    Returns:
        The content of ``sources.json``.
    """
    from pairtrace.plots import plot_enrichment, save_png

    _check_statistic(statistic)
    ranking = load_ranking(ranking_path)
    enrichment = compute_source_enrichment(ranking, k, columns)
    suggested = suggest_source_ablation(enrichment, p_max=p_max, min_enrichment=min_enrichment, statistic=statistic)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "sources.parquet") as tmp:
        enrichment.to_parquet(tmp, index=False)
    criteria = {"p_max": p_max, "min_enrichment": min_enrichment, "column": "chosen_model",
                "statistic": "scan_p_value" if statistic == "scan" else "p_value",
                "enrichment": "scan_enrichment" if statistic == "scan" else "enrichment"}
    summary = {
        "kind": "sources",
        "ranking": str(ranking_path),
        "ranking_method": ranking.metadata.get("method"),
        "ranking_layer": ranking.metadata.get("layer"),
        "k": int(enrichment.attrs.get("k", k)),
        "k_requested": k,
        "n_pairs": len(ranking),
        "n_scored": int(enrichment.attrs.get("n_scored", 0)),
        "columns": list(columns),
        "suggested_ablation": suggested,
        "criteria": criteria,
        "ablation": {"chosen_models": suggested, "criteria": criteria},
        "rows": [{key: _json_ready(v) for key, v in rec.items()} for rec in enrichment.to_dict(orient="records")],
        "by_k": compute_enrichment_across_k(ranking, sweep_ks) if sweep_ks else [],
        "pairtrace_version": __version__,
    }
    write_json_atomic(summary, out / "sources.json")
    ablation = {"chosen_models": suggested, "criteria": criteria, "k": summary["k"], "ranking": str(ranking_path)}
    write_json_atomic(ablation, out / "ablation.json")
    if not enrichment.empty:
        title = f"Enrichment in the top-{summary['k']} of {summary['n_scored']} scored pairs"
        save_png(plot_enrichment(enrichment, title=title), out / "sources.png")
    return summary
