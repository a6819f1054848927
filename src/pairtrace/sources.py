"""Model-level (source) attribution: which sources and generating models are over-represented in the top-k.

For every value of a metadata column (``chosen_model``, ``rejected_model``, ``source``) of a ranking:

    N = scored pairs (the population the top-k is drawn from; unscored pairs can never be drawn)
    K = scored pairs with that value            k = top-k size            x = pairs with that value in the top-k
    enrichment = (x / k) / (K / N)              p = P[X >= x], X ~ Hypergeometric(N, K, k) = hypergeom.sf(x-1, N, K, k)

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
from pairtrace.records import write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("chosen_model", "rejected_model", "source")
MISSING = "(missing)"
"""Label of pairs whose metadata column is empty."""
ENRICHMENT_COLUMNS = ("column", "value", "count_top", "share_top", "count_all", "share_all", "enrichment",
                      "p_value", "q_value")


def compute_source_enrichment(ranking: Ranking, k: int,
                              columns: Sequence[str] = DEFAULT_COLUMNS) -> pd.DataFrame:
    """Enrichment of each metadata value among the top-k pairs of a ranking, with a hypergeometric p-value.

    Args:
        ranking: A ranking (``table`` with the metadata columns, best-first).
        k: Size of the top set (clipped to the number of scored pairs).
        columns: Metadata columns to test; a column that is empty for every pair is skipped.

    Returns:
        One row per (column, value): ``count_top``, ``share_top``, ``count_all``, ``share_all``, ``enrichment``,
        ``p_value`` (one-sided, over-representation) and ``q_value`` (Benjamini–Hochberg over all rows), sorted by
        enrichment (high first), then p-value (low first). Missing values are reported as :data:`MISSING`.

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
            rows.append({
                "column": column,
                "value": value,
                "count_top": x,
                "share_top": share_top,
                "count_all": int(n_value),
                "share_all": share_all,
                "enrichment": share_top / share_all,
                "p_value": float(hypergeom.sf(x - 1, n_pop, int(n_value), k)),
            })
    frame = pd.DataFrame(rows, columns=[c for c in ENRICHMENT_COLUMNS if c != "q_value"])
    frame["p_value"] = frame["p_value"].clip(lower=0.0, upper=1.0)
    frame["q_value"] = false_discovery_control(frame["p_value"].to_numpy()) if len(frame) else []
    frame = frame.sort_values(["enrichment", "p_value", "column", "value"], ascending=[False, True, True, True],
                              kind="stable").reset_index(drop=True)
    frame.attrs.update({"k": k, "n_scored": n_pop, "n_pairs": len(table), "top_ids": top["id"].tolist()})
    return frame


def suggest_source_ablation(enrichment: pd.DataFrame, p_max: float = 0.01, min_enrichment: float = 2.0,
                            use_q_value: bool = False) -> list[str]:
    """Chosen models to drop in a source-ablation retrain: significantly and strongly enriched in the top-k.

    Args:
        enrichment: Output of :func:`compute_source_enrichment`.
        p_max: Largest p-value (or q-value) accepted.
        min_enrichment: Smallest enrichment accepted.
        use_q_value: Test the Benjamini–Hochberg q-value instead of the raw p-value.

    Returns:
        Chosen-model names, most enriched first (never the :data:`MISSING` label).
    """
    if enrichment.empty:
        return []
    stat = "q_value" if use_q_value else "p_value"
    keep = enrichment[(enrichment["column"] == "chosen_model") & (enrichment[stat] <= p_max)
                      & (enrichment["enrichment"] >= min_enrichment) & (enrichment["value"] != MISSING)]
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
                min_enrichment: float = 2.0, sweep_ks: Sequence[int] = ()) -> dict:
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

    Returns:
        The content of ``sources.json``.
    """
    from pairtrace.plots import plot_enrichment, save_png

    ranking = load_ranking(ranking_path)
    enrichment = compute_source_enrichment(ranking, k, columns)
    suggested = suggest_source_ablation(enrichment, p_max=p_max, min_enrichment=min_enrichment)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enrichment.to_parquet(out / "sources.parquet", index=False)
    criteria = {"p_max": p_max, "min_enrichment": min_enrichment, "statistic": "p_value", "column": "chosen_model"}
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
