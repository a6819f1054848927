"""One self-contained HTML report of a run directory.

The report is rendered from whatever artifacts the run directory holds; each section appears only when its input
exists (and a section whose input is malformed is skipped with a note, never the whole report):

========================  =====================================================================================
section                   input (relative to the run directory)
========================  =====================================================================================
what was run              ``results.json``: ``config``, ``timings``, ``versions``, ``hardware``, ``organism``, …
headline bars             ``results.json``: ``baseline.harmful``, ``interventions`` at ``headline_k``, ``trigger``
k sweep                   ``results.json``: ``interventions`` at two or more values of k
capabilities              ``results.json``: ``harmful_no_trigger``, ``benign_helpfulness``, ``over_refusal``
cost                      ``results.json``: ``cost``
checks                    ``results.json``: ``checks``
attribution quality       ``results.json``: ``attribution_quality``; ROC from rankings + labels (below)
discovery                 ``discover/summary.json``, ``discover/heatmap.png``
source enrichment         ``sources/sources.json`` (``sources/sources.png``, redrawn if missing)
steering                  ``steer/steer.json`` (``steer/steer.png``, redrawn if missing)
reproduce                 ``results.json``: ``commands``
========================  =====================================================================================

ROC curves need per-pair scores and labels: rankings are read from ``rankings/<method>.parquet``,
``rankings/<method>/ranking.parquet`` or ``<method>/ranking.parquet`` (method from the ranking's metadata, else the
file or folder name); labels from the path in ``results.json``'s ``labels``, ``organism.labels`` or
``config.data.labels``, else ``labels.jsonl``, ``organism/labels.jsonl`` or ``organism/data/labels.jsonl``.

Every harmful rate is shown both ways, as ``results.json`` holds it: with unknown verdicts left out (the primary
rate, which the checks decide on) and counted as harmful (``rate_unknown_as_harmful``); reductions likewise. Titles
name the run's trigger from ``results.json``'s ``trigger``.

Figures are embedded as base64 PNG, the CSS is inline, there is no script and no external URL.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pairtrace import __version__
from pairtrace.errors import DataError, PairtraceError
from pairtrace.records import write_text_atomic

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "report_template.html"
CAPABILITY_COLUMNS = (
    ("harmful", "harmful (trigger)"),
    ("harmful_no_trigger", "harmful (no trigger)"),
    ("benign_helpfulness", "benign helpfulness"),
    ("format_following", "format following"),
    ("over_refusal", "over-refusal (XSTest)"),
)
CHANGE_KEY = "benign_helpfulness_change"
"""Paired difference of benign helpfulness against the baseline retrain (``results.json``, per intervention)."""
REPORTED_PACKAGES = ("torch", "transformers", "trl", "datasets", "numpy", "scipy", "scikit-learn")
MAX_SOURCE_ROWS = 15


# ------------------------------------------------------------------------------------------------- formatting


def _finite(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def format_pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage, ``–`` when missing."""
    x = _finite(value)
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def format_num(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals (thousands separated), ``–`` when missing."""
    x = _finite(value)
    return "–" if x is None else f"{x:,.{digits}f}"


def format_sci(value: Any) -> str:
    """A number in scientific notation for small/large values, ``–`` when missing."""
    x = _finite(value)
    if x is None:
        return "–"
    return f"{x:.2e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6) else f"{x:.3g}"


def format_ci(rate: Any) -> str:
    """``[lo, hi]`` as percentages from a normalised rate dict, ``–`` when missing."""
    if not isinstance(rate, dict):
        return "–"
    low, high = _finite(rate.get("low")), _finite(rate.get("high"))
    if low is None or high is None:
        return "–"
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _interval(value: dict[str, Any]) -> tuple[Any, Any]:
    """``(low, high)`` of an entry: its ``ci`` pair, else its ``low`` and ``high`` keys."""
    ci = value.get("ci")
    return (ci[0], ci[1]) if isinstance(ci, list | tuple) and len(ci) == 2 else (value.get("low"), value.get("high"))


def normalise_rate(value: Any) -> dict[str, Any] | None:
    """A rate entry as ``{"rate", "low", "high", "n", "unknown", "unknown_as_harmful"}``.

    Accepts ``{"rate", "ci": [lo, hi], "n", "unknown"}`` (results.json) and ``{"rate", "low", "high", ...}``;
    missing parts are ``None``; anything without a rate gives ``None``. ``unknown_as_harmful`` is
    ``{"rate", "low", "high"}`` from a harmful entry's ``rate_unknown_as_harmful`` and ``ci_unknown_as_harmful``
    (``None`` without them).
    """
    if not isinstance(value, dict) or _finite(value.get("rate")) is None:
        return None
    low, high = _interval(value)
    return {"rate": _finite(value["rate"]), "low": _finite(low), "high": _finite(high),
            "n": value.get("n"), "unknown": value.get("unknown"), "unknown_as_harmful": _unknown_as_harmful(value)}


def _unknown_as_harmful(value: dict[str, Any]) -> dict[str, Any] | None:
    rate = _finite(value.get("rate_unknown_as_harmful"))
    if rate is None:
        return None
    ci = value.get("ci_unknown_as_harmful")
    low, high = ci if isinstance(ci, list | tuple) and len(ci) == 2 else (None, None)
    return {"rate": rate, "low": _finite(low), "high": _finite(high)}


def trigger_label(results: dict[str, Any]) -> str:
    """What the evaluated harmful prompts are called: ``results.json``'s ``trigger.label`` (e.g. ``harmful request
    + 1–3 distractors``), else :data:`pairtrace.evaluate.TRIGGER_LABEL`."""
    from pairtrace.evaluate import TRIGGER_LABEL

    trigger = results.get("trigger")
    label = trigger.get("label") if isinstance(trigger, dict) else None
    return str(label) if isinstance(label, str) and label else TRIGGER_LABEL


def normalise_change(value: Any) -> dict[str, Any] | None:
    """A change entry ``{"change", "ci": [lo, hi], "n_prompts"}`` as ``{"rate", "low", "high", "n"}``."""
    if not isinstance(value, dict) or _finite(value.get("change")) is None:
        return None
    low, high = _interval(value)
    return {"rate": _finite(value["change"]), "low": _finite(low), "high": _finite(high), "n": value.get("n_prompts")}


def format_points(value: Any, digits: int = 1) -> str:
    """A difference of fractions in signed percentage points (``-0.058`` gives ``-5.8``), ``–`` when missing."""
    x = _finite(value)
    return "–" if x is None else f"{100 * x:+.{digits}f}"


def _png_uri(png: bytes) -> str:
    from pairtrace.plots import png_data_uri

    return png_data_uri(png)


def _file_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG"):
        logger.warning("%s is not a PNG image; not embedded", path)
        return None
    return _png_uri(data)


def _figure_uri(fig) -> str:
    from pairtrace.plots import figure_to_png

    return _png_uri(figure_to_png(fig))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


# ---------------------------------------------------------------------------------------------------- sections


def _flatten(value: Any, prefix: str = "", limit: int = 40) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            rows.extend(_flatten(sub, f"{prefix}{key}.", limit))
    else:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        rows.append((prefix.rstrip("."), text if len(text) <= 200 else text[:199] + "…"))
    return rows[:limit]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_run_section(results: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """Configuration, timings, versions and organism summary."""
    if not results:
        return None
    summary = [(k, format_num(results[k], 0) if isinstance(results.get(k), int | float) else str(results[k]))
               for k in ("n_pairs", "headline_k") if results.get(k) is not None]
    if results.get("k_values"):
        summary.append(("k_values", ", ".join(str(k) for k in results["k_values"])))
    base = _baseline_entry(results)
    if isinstance(base.get("seeds"), list) and len(base["seeds"]) > 1:
        summary.append(("DPO seeds (baseline and headline retrains)", ", ".join(str(s) for s in base["seeds"])))
    hardware = results.get("hardware")
    if isinstance(hardware, dict) and hardware.get("cpu"):
        devices = hardware.get("cuda_devices") or []
        summary.append(("hardware", f"{hardware['cpu']}, {hardware.get('cpu_count')} cores"
                        + (f", {hardware['torch_cpu_capability']}" if hardware.get("torch_cpu_capability") else "")
                        + (f"; {', '.join(map(str, devices))}" if devices else "")))
    summary.append(("run directory", str(run_dir)))
    timings = []
    raw_timings = results.get("timings") or {}
    if isinstance(raw_timings, dict):
        total = sum(v for v in (_finite(x) for x in raw_timings.values()) if v is not None)
        for stage, seconds in raw_timings.items():
            s = _finite(seconds)
            timings.append({"stage": stage, "seconds": s, "share": s / total if s is not None and total else None})
        if timings:
            timings.append({"stage": "total", "seconds": total, "share": 1.0 if total else None})
    recorded = dict(results.get("versions")) if isinstance(results.get("versions"), dict) else {}
    if results.get("pairtrace_version") and "pairtrace" not in recorded:
        recorded["pairtrace"] = results["pairtrace_version"]
    report_env = {"pairtrace": __version__, "python": platform.python_version(),
                  **{p: _package_version(p) for p in REPORTED_PACKAGES}}
    versions = [{"name": name, "run": str(recorded.get(name, "–")), "report": report_env.get(name, "–")}
                for name in dict.fromkeys([*recorded, *report_env])]
    config = results.get("config")
    return {
        "summary": summary,
        "timings": timings,
        "versions": versions,
        "organism": _flatten(results["organism"]) if isinstance(results.get("organism"), dict) else [],
        "config": yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=110) if config else "",
    }


def _interventions(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for item in results.get("interventions") or []:
        if not isinstance(item, dict):
            continue
        interval = item.get("reduction_interval") if isinstance(item.get("reduction_interval"), dict) else {}
        rows.append({
            "method": str(item.get("method", "?")),
            "action": str(item.get("action", "?")),
            "k": item.get("k"),
            "reduction": _finite(item.get("reduction")),
            "reduction_ci": _ci_dict(interval.get("ci")),
            "reduction_unknown_as_harmful": _finite(item.get("reduction_unknown_as_harmful")),
            "reduction_ci_unknown_as_harmful": _ci_dict(interval.get("ci_unknown_as_harmful")),
            **{key: normalise_rate(item.get(key)) for key, _ in CAPABILITY_COLUMNS},
            CHANGE_KEY: normalise_change(item.get(CHANGE_KEY)),
            "per_seed": format_per_seed(item.get("per_seed")),
        })
    return rows


def _ci_dict(ci: Any) -> dict[str, Any] | None:
    """``[lo, hi]`` as ``{"low", "high"}`` (what the ``ci`` filter reads), ``None`` when missing."""
    if not isinstance(ci, list | tuple) or len(ci) != 2 or None in (_finite(ci[0]), _finite(ci[1])):
        return None
    return {"low": _finite(ci[0]), "high": _finite(ci[1])}


def format_per_seed(per_seed: Any, key: str = "harmful") -> str | None:
    """One rate of each DPO seed of a pooled experiment, e.g. ``82% · 91% · 78%`` (None for a single retrain)."""
    if not isinstance(per_seed, list) or len(per_seed) < 2:
        return None
    return " · ".join(format_pct(row.get(key)) if isinstance(row, dict) else "–" for row in per_seed)


def _headline_k(results: dict[str, Any], rows: list[dict[str, Any]]) -> int | None:
    if results.get("headline_k") is not None:
        return int(results["headline_k"])
    ks = [r["k"] for r in rows if r["k"] is not None and r["action"] != "source_ablation"]
    return max(ks) if ks else None


def _at_headline(rows: list[dict[str, Any]], k: int | None) -> list[dict[str, Any]]:
    return [r for r in rows if r["action"] == "source_ablation" or (k is not None and r["k"] == k)]


def _baseline_entry(results: dict[str, Any]) -> dict[str, Any]:
    """The raw ``baseline`` entry of ``results.json`` (empty when absent or malformed)."""
    return results.get("baseline") if isinstance(results.get("baseline"), dict) else {}


def _baseline(results: dict[str, Any]) -> dict[str, Any]:
    base = _baseline_entry(results)
    return {key: normalise_rate(base.get(key)) for key, _ in CAPABILITY_COLUMNS}


def build_headline_section(results: dict[str, Any]) -> dict[str, Any] | None:
    """Figure-1-style bars and table of harmful rates at the headline k."""
    from pairtrace.plots import plot_rate_bars

    rows = _interventions(results)
    k = _headline_k(results, rows)
    chosen = [r for r in _at_headline(rows, k) if r["harmful"] is not None]
    baseline = _baseline(results)["harmful"]
    if not chosen and baseline is None:
        return None
    figure = None
    if chosen:
        frame = pd.DataFrame([{"method": r["method"], "action": r["action"], **r["harmful"]} for r in chosen])
        figure = _figure_uri(plot_rate_bars(frame, baseline=baseline, title=f"Harmful rate at k = {k}"))
    baseline_seeds = format_per_seed(_baseline_entry(results).get("per_seed"))
    return {"k": k, "rows": chosen, "baseline": baseline, "figure": figure, "baseline_seeds": baseline_seeds,
            "seeded": bool(baseline_seeds or any(r["per_seed"] for r in chosen)), "trigger": trigger_label(results)}


def build_sweep_section(results: dict[str, Any]) -> dict[str, Any] | None:
    """Harmful rate against k (figure, and a table with both rates), when interventions were run at two or more k."""
    from pairtrace.plots import plot_rate_lines

    rows = [r for r in _interventions(results)
            if r["harmful"] is not None and r["k"] is not None and r["action"] != "source_ablation"]
    if len({r["k"] for r in rows}) < 2:
        return None
    frame = pd.DataFrame([{"method": r["method"], "action": r["action"], "k": float(r["k"]), **r["harmful"]}
                          for r in rows])
    fig = plot_rate_lines(frame, x="k", series=("method", "action"), ylabel="harmful rate",
                          xlabel="k (pairs filtered or switched)", baseline=_baseline(results)["harmful"],
                          title="Harmful rate against k")
    rows.sort(key=lambda r: (r["method"], r["action"], r["k"]))
    return {"figure": _figure_uri(fig), "rows": rows, "trigger": trigger_label(results)}


def build_capabilities_section(results: dict[str, Any]) -> dict[str, Any] | None:
    """Baseline and headline-k interventions on every reported rate."""
    rows = _interventions(results)
    k = _headline_k(results, rows)
    table = [{"label": "baseline", "k": 0, "cells": _baseline(results)}]
    table += [{"label": f"{r['method']} {r['action']}", "k": r["k"],
               "cells": {key: r[key] for key, _ in CAPABILITY_COLUMNS} | {CHANGE_KEY: r[CHANGE_KEY]}}
              for r in _at_headline(rows, k)]
    keys = [key for key, _ in CAPABILITY_COLUMNS if key != "harmful"]
    if not any(row["cells"].get(key) for row in table for key in keys):
        return None
    columns = [{"key": key, "title": title} for key, title in CAPABILITY_COLUMNS]
    if any(row["cells"].get(CHANGE_KEY) for row in table):
        at = next(i for i, c in enumerate(columns) if c["key"] == "benign_helpfulness") + 1
        columns.insert(at, {"key": CHANGE_KEY, "title": "helpfulness change vs baseline (points)", "points": True})
    return {"columns": columns, "rows": [r for r in table if any(r["cells"].values())]}


def build_checks_section(results: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The run's checks against the paper's figures (:func:`pairtrace.experiment.checks.compute_checks`): value,
    95% interval and retrains pooled where the check has them, the other reduction, and why a check is undecided."""
    rows = []
    for c in results.get("checks") or []:
        if not isinstance(c, dict) or "check" not in c:
            continue
        rows.append({"check": str(c["check"]), "value": _finite(c.get("value")), "threshold": c.get("threshold"),
                     "ok": bool(c.get("ok")), "ci": _ci_dict(c.get("ci")), "n_retrains": c.get("n_retrains"),
                     "n_baseline_retrains": c.get("n_baseline_retrains"), "reason": c.get("reason"),
                     "reduction_unknown_as_harmful": _finite(c.get("reduction_unknown_as_harmful"))})
    return rows or None


def build_cost_section(results: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Cost rows (method, wall time, passes, FLOPs, FLOPs as a multiple of the probe's).

    The ratio is the row's ``flops_ratio`` (:func:`pairtrace.cost.cost_table`), else its ``wall_ratio`` when the
    FLOPs are not estimated.
    """
    rows = [r for r in results.get("cost") or [] if isinstance(r, dict)]
    out = []
    for r in rows:
        row = {k: r.get(k) for k in ("method", "wall_s", "forward_passes", "backward_passes", "flops_estimate")}
        ratio = next((r.get(k) for k in ("ratio_to_probe", "flops_ratio", "wall_ratio") if r.get(k) is not None), None)
        row["ratio_to_probe"] = ratio
        out.append(row)
    return out or None


def find_labels(run_dir: Path, results: dict[str, Any]) -> Path | None:
    """The ground-truth labels file of a run, if any (see the module docstring for where it is looked for)."""
    organism = results.get("organism") if isinstance(results.get("organism"), dict) else {}
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    candidates = [results.get("labels"), organism.get("labels"), data.get("labels"), "labels.jsonl",
                  "organism/labels.jsonl", "organism/data/labels.jsonl"]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            path = Path(candidate)
            path = path if path.is_absolute() else run_dir / path
            if path.is_file():
                return path
    return None


def find_rankings(run_dir: Path) -> dict[str, Path]:
    """Ranking Parquet files of a run by method name (``rankings/*.parquet``, ``*/ranking.parquet``)."""
    from pairtrace.attribute import load_ranking

    found: dict[str, Path] = {}
    paths = sorted((run_dir / "rankings").glob("*.parquet")) + sorted(run_dir.glob("*/ranking.parquet"))
    paths += sorted(run_dir.glob("rankings/*/ranking.parquet"))
    for path in paths:
        default = path.parent.name if path.stem == "ranking" else path.stem
        try:
            method = str(load_ranking(path).metadata.get("method") or default)
        except (PairtraceError, OSError, ValueError) as exc:  # not a ranking: skipped, not fatal
            logger.warning("skipping %s: %s", path, exc)
            continue
        if method in found and path.stem == "ranking":
            method = default
        found.setdefault(method, path)
    return found


def compute_roc_curves(rankings: dict[str, Path], labels_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray,
                                                                                          float]]:
    """ROC of each ranking's scores against the ``contaminated`` labels (unscored pairs rank lowest)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from pairtrace.attribute import load_ranking
    from pairtrace.labels import label_scores, load_labels

    labels = load_labels(labels_path)
    curves = {}
    for method, path in rankings.items():
        scored = label_scores(load_ranking(path).table, labels)
        if scored is None:
            return {}
        if scored.y.all() or not scored.y.any():
            continue
        fpr, tpr, _ = roc_curve(scored.y, scored.scores)
        curves[method] = (fpr, tpr, float(roc_auc_score(scored.y, scored.scores)))
    return curves


def build_quality_section(results: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """AUROC / precision table and, where scores and labels exist, ROC curves."""
    from pairtrace.plots import plot_roc

    quality = results.get("attribution_quality") if isinstance(results.get("attribution_quality"), dict) else {}
    rows = [{"method": m, **{k: v.get(k) for k in ("auroc", "precision_at_contaminated", "n_contaminated")}}
            for m, v in quality.items() if isinstance(v, dict)]
    figure, labels_name = None, None
    labels = find_labels(run_dir, results)
    if labels is not None:
        rankings = find_rankings(run_dir)
        curves = compute_roc_curves(rankings, labels) if rankings else {}
        if curves:
            figure = _figure_uri(plot_roc(curves))
            labels_name = str(labels.relative_to(run_dir)) if labels.is_relative_to(run_dir) else str(labels)
    if not rows and figure is None:
        return None
    return {"rows": rows, "figure": figure, "labels": labels_name}


def _counts_text(counts: Any, limit: int = 3) -> str:
    if not isinstance(counts, dict) or not counts:
        return "–"
    return ", ".join(f"{k} ({v})" for k, v in list(counts.items())[:limit])


def build_discovery_section(run_dir: Path) -> dict[str, Any] | None:
    """Heatmap and per-cluster table from ``discover/``, one block per view (pooling of the response means)."""
    directory = run_dir / "discover"
    summary = _read_json(directory / "summary.json")
    if summary is None and _file_uri(directory / "heatmap.png") is None:
        return None
    summary = summary or {}
    views = [_discovery_view(summary, directory)]
    for view in summary.get("views") or []:
        if isinstance(view, dict) and isinstance(view.get("dir"), str):
            views.append(_discovery_view(view, directory / view["dir"]))
    return {"views": views, "several": len(views) > 1}


def _discovery_view(summary: dict[str, Any], directory: Path) -> dict[str, Any]:
    labels = summary.get("labels") if isinstance(summary.get("labels"), dict) else {}
    by_cluster = {c.get("cluster"): c for c in labels.get("clusters", []) if isinstance(c, dict)}
    clusters = []
    for c in summary.get("pair_clusters") or []:
        if not isinstance(c, dict):
            continue
        prompts = c.get("top_prompts") or []
        label = by_cluster.get(c.get("cluster"), {})
        clusters.append({
            **c,
            "chosen_models_text": _counts_text(c.get("chosen_models")),
            "sources_text": _counts_text(c.get("sources")),
            "words_text": ", ".join(w.get("word", "") for w in (c.get("distinctive_words") or [])[:8]) or "–",
            "example": prompts[0] if prompts else None,
            "label_text": (f"{label.get('dominant')} (purity {format_num(label.get('purity'))})"
                           if label.get("dominant") is not None else "–"),
        })
    # strongest link first: the mean cosine between the cluster's pairs and its closest behaviour cluster
    clusters.sort(key=lambda c: -c["link"] if isinstance(c.get("link"), int | float) else math.inf)
    prompts = summary.get("prompts") if isinstance(summary.get("prompts"), dict) else {}
    pair_info = summary.get("pair_clustering") if isinstance(summary.get("pair_clustering"), dict) else {}
    zero = prompts.get("n_zero_behaviour")
    noise = pair_info.get("noise_share")
    noise_text = (f"; HDBSCAN left {format_num(100 * noise, 1)}% of them as noise, clustered apart"
                  if isinstance(noise, int | float) else "")
    lead = (f"{prompts.get('n_kept', '?')} of {prompts.get('n_prompts', '?')} prompts were answered differently by "
            f"M0 and M1 and give one behaviour vector each{f' ({zero} without a direction, dropped)' if zero else ''}"
            f"; {summary.get('n_columns', '?')} of {summary.get('n_pairs_total', '?')} pairs are columns; pairs "
            f"were clustered on their {pair_info.get('features', '?')} into {pair_info.get('n_clusters', '?')} "
            f"clusters ({pair_info.get('criterion', '?')}, silhouette {format_num(pair_info.get('silhouette'), 3)}"
            f"{noise_text}).")
    from pairtrace.models import describe_response_pooling

    return {"title": f"response means over {describe_response_pooling(summary.get('response_tokens'))}", "lead": lead,
            "figure": _file_uri(directory / "heatmap.png"), "clusters": clusters, "has_labels": bool(by_cluster),
            "behaviours": [b for b in labels.get("behaviours", []) if isinstance(b, dict)]}


def build_sources_section(run_dir: Path) -> dict[str, Any] | None:
    """Enrichment chart and table from ``sources/``."""
    from pairtrace.plots import plot_enrichment

    directory = run_dir / "sources"
    summary = _read_json(directory / "sources.json")
    if summary is None:
        return None
    rows = [r for r in summary.get("rows") or [] if isinstance(r, dict)]
    figure = _file_uri(directory / "sources.png")
    if figure is None and rows:
        figure = _figure_uri(plot_enrichment(pd.DataFrame(rows)))
    suggested = summary.get("suggested_ablation") or []
    criteria = summary.get("criteria") or {}
    rule = (f" ({criteria.get('statistic', 'p_value')} ≤ {format_sci(criteria.get('p_max'))}, "
            f"{criteria.get('enrichment', 'enrichment')} ≥ {format_num(criteria.get('min_enrichment'))})"
            if criteria.get("p_max") is not None else "")
    lead = (f"Top-{summary.get('k', '?')} of {summary.get('n_scored', '?')} scored pairs "
            f"({summary.get('ranking_method') or 'ranking'}). Suggested for source ablation{rule}: "
            f"{', '.join(suggested) if suggested else 'none'}.")
    by_k = [e for e in summary.get("by_k") or [] if isinstance(e, dict) and isinstance(e.get("rows"), list)]
    return {"lead": lead, "k": summary.get("k"), "figure": figure, "rows": rows[:MAX_SOURCE_ROWS], "by_k": by_k}


def _steer_unknown_as_harmful(row: dict[str, Any]) -> float | None:
    """A steering row's behaviour rate with its unknown verdicts counted as harmful (the point; ``steer.json`` keeps
    no interval for it): ``(rate * judged + unknown) / (judged + unknown)``."""
    rate, judged, unknown = _finite(row.get("rate")), row.get("judged"), row.get("unknown")
    if not isinstance(judged, int) or not isinstance(unknown, int) or judged + unknown == 0:
        return None
    if rate is None:
        return 1.0 if unknown and not judged else None
    return (rate * judged + unknown) / (judged + unknown)


def build_steer_section(run_dir: Path) -> dict[str, Any] | None:
    """Steering curve and table from ``steer/``."""
    from pairtrace.plots import plot_rate_lines
    from pairtrace.steer import steer_frame

    directory = run_dir / "steer"
    summary = _read_json(directory / "steer.json")
    if summary is None:
        return None
    rows = []
    for r in summary.get("results") or []:
        if isinstance(r, dict):
            rate = normalise_rate(r) or {"rate": None, "low": None, "high": None}
            rows.append({**r, **rate, "rate_unknown_as_harmful": _steer_unknown_as_harmful(r)})
    figure = _file_uri(directory / "steer.png")
    frame = steer_frame(summary)
    if figure is None and not frame.empty:
        figure = _figure_uri(plot_rate_lines(frame, x="alpha", series=("condition", "layer"), ylabel="behaviour rate"))
    norms = summary.get("norms") or {}
    lead = (f"Layers {', '.join(str(k) for k in summary.get('layers') or []) or '?'}; α in units of the mean "
            f"residual norm ({', '.join(f'layer {k}: {format_num(v)}' for k, v in norms.items()) or 'not recorded'})"
            f"; judge: {summary.get('judge', '?')}.")
    return {"lead": lead, "figure": figure, "rows": rows}


# ---------------------------------------------------------------------------------------------------- assembly


SECTION_TITLES = (
    ("run", "run", "What was run"),
    ("headline", "headline", "Headline"),
    ("sweep", "sweep", "k sweep"),
    ("capabilities", "capabilities", "Capabilities"),
    ("cost", "cost", "Cost"),
    ("checks", "checks", "Checks"),
    ("quality", "quality", "Attribution quality"),
    ("discovery", "discovery", "Discovery"),
    ("sources", "sources", "Sources"),
    ("steer", "steering", "Steering"),
    ("commands", "reproduce", "Reproduce"),
)
"""(context key, HTML id, navigation title) of every section, in page order."""


def build_report_context(run_dir: str | Path) -> dict[str, Any]:
    """Everything the template renders, from the artifacts present in ``run_dir``.

    A section whose builder fails on malformed input is left out and the failure is logged and listed under
    ``problems``; only an unreadable ``results.json`` is fatal.

    Raises:
        DataError: ``run_dir`` is not a directory, or ``results.json`` is not a JSON object.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    results = _read_json(run_dir / "results.json") or {}
    builders: dict[str, Callable[[], Any]] = {
        "run": lambda: build_run_section(results, run_dir),
        "headline": lambda: build_headline_section(results),
        "sweep": lambda: build_sweep_section(results),
        "capabilities": lambda: build_capabilities_section(results),
        "cost": lambda: build_cost_section(results),
        "checks": lambda: build_checks_section(results),
        "quality": lambda: build_quality_section(results, run_dir),
        "discovery": lambda: build_discovery_section(run_dir),
        "sources": lambda: build_sources_section(run_dir),
        "steer": lambda: build_steer_section(run_dir),
        "commands": lambda: [str(c) for c in results.get("commands") or []] or None,
    }
    context: dict[str, Any] = {"problems": []}
    for key, build in builders.items():
        try:
            context[key] = build()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, DataError) as exc:
            logger.warning("report section '%s' skipped: %s", key, exc)
            context["problems"].append(f"{key}: {exc}")
            context[key] = None
    context["sections"] = [{"id": html_id, "title": title} for key, html_id, title in SECTION_TITLES
                           if context.get(key)]
    context.update({"title": run_dir.resolve().name, "run_dir": str(run_dir), "version": __version__,
                    "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "n_pairs": results.get("n_pairs")})
    return context


def render_report(context: dict[str, Any]) -> str:
    """Render the HTML of a context from :func:`build_report_context` with the packaged Jinja template."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update({"pct": format_pct, "num": format_num, "sci": format_sci, "ci": format_ci,
                        "points": format_points})
    source = resources.files("pairtrace").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    return env.from_string(source).render(**context)


def write_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write one self-contained HTML report of a run directory.

    Args:
        run_dir: The run directory (``results.json`` and the optional ``discover/``, ``sources/``, ``steer/``).
        out_path: Output file; default ``run_dir/report.html``.

    Returns:
        The path written.
    """
    run_dir = Path(run_dir)
    html = render_report(build_report_context(run_dir))
    out = Path(out_path) if out_path is not None else run_dir / "report.html"
    return write_text_atomic(html, out)
