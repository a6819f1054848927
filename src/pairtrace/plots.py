"""Shared figure helpers: every figure of the project is drawn here, headless (Agg), and returned as a Figure.

Callers turn a figure into PNG bytes with :func:`figure_to_png` (for embedding in the HTML report) or write it with
:func:`save_png`; both close the figure so long runs do not accumulate open figures.
"""

from __future__ import annotations

import base64
import io
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    # Headless by default; an interactive session that already chose a backend keeps it.
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from pairtrace.records import write_bytes_atomic

DEFAULT_DPI = 110
PALETTE = "tab10"


def figure_to_png(fig: Figure, dpi: int = DEFAULT_DPI) -> bytes:
    """Render a figure to PNG bytes and close it.

    Args:
        fig: The figure.
        dpi: Resolution.

    Returns:
        The PNG file content.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write a figure as a PNG file (parent folders are created) and close it.

    Returns:
        The path written.
    """
    return write_bytes_atomic(figure_to_png(fig, dpi=dpi), path)


def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for embedding PNG bytes in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _colours(n: int) -> list:
    cmap = plt.get_cmap(PALETTE)
    return [cmap(i % cmap.N) for i in range(n)]


def _error_bars(frame: pd.DataFrame) -> np.ndarray:
    """[2, n] distances from ``rate`` to ``low``/``high`` (0 where an interval is missing)."""
    rate = frame["rate"].to_numpy(dtype=float)
    low = frame["low"].to_numpy(dtype=float) if "low" in frame else np.full_like(rate, np.nan)
    high = frame["high"].to_numpy(dtype=float) if "high" in frame else np.full_like(rate, np.nan)
    below = np.where(np.isfinite(low), rate - low, 0.0)
    above = np.where(np.isfinite(high), high - rate, 0.0)
    return np.clip(np.vstack([below, above]), 0.0, None)


def plot_enrichment(enrichment: pd.DataFrame, top_n: int = 20, title: str = "Source enrichment in the top-k") -> Figure:
    """Horizontal bars of enrichment (share in top-k / share overall) per column value.

    Args:
        enrichment: Frame with ``column``, ``value``, ``enrichment``, ``count_top``, ``p_value`` and optionally
            ``scan_p_value`` (the output of :func:`pairtrace.sources.compute_source_enrichment`), best first.
        top_n: Bars to draw (the first ``top_n`` rows).
        title: Figure title.
    """
    frame = enrichment.head(top_n).iloc[::-1]
    columns = list(dict.fromkeys(enrichment["column"]))
    colour_of = dict(zip(columns, _colours(len(columns)), strict=True))
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(frame), 3) + 1.2))
    labels = [f"{c}: {v}" for c, v in zip(frame["column"], frame["value"], strict=True)]
    values = frame["enrichment"].to_numpy(dtype=float)
    ax.barh(range(len(frame)), values, color=[colour_of[c] for c in frame["column"]])
    scan = frame["scan_p_value"] if "scan_p_value" in frame else pd.Series(np.nan, index=frame.index)
    for i, (val, count, p, p_scan) in enumerate(zip(values, frame["count_top"], frame["p_value"], scan,
                                                     strict=True)):
        note = f", scan p={p_scan:.1e}" if np.isfinite(p_scan) else ""
        ax.text(val, i, f"  n={int(count)}, p={p:.1e}{note}", va="center", fontsize=8)
    ax.set_yticks(range(len(frame)), labels, fontsize=8)
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xlabel("enrichment (share in top-k / share overall)")
    ax.set_xlim(0, max(1.5, float(np.nanmax(values)) * 1.35) if len(values) else 2)
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour_of[c]) for c in columns]
    ax.legend(handles, columns, loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _finish_rate_axes(fig: Figure, ax, ylabel: str, title: str) -> Figure:
    """A rate axis from 0 in percent, the title, the legend outside on the right; the figure laid out."""
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_rate_bars(rates: pd.DataFrame, baseline: Mapping | None = None, title: str = "",
                   ylabel: str = "harmful rate") -> Figure:
    """Grouped bars of a rate with intervals: one group per ``method``, one bar per ``action`` (Figure-1 style).

    Args:
        rates: Frame with ``method``, ``action``, ``rate``, and optionally ``low``/``high`` (95% interval).
        baseline: Optional ``{"rate", "low", "high"}`` of the unmodified retrain, drawn as a line and band.
        title: Figure title.
        ylabel: Y-axis label.
    """
    methods = list(dict.fromkeys(rates["method"]))
    actions = list(dict.fromkeys(rates["action"]))
    width = 0.8 / max(len(actions), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(methods) + 2), 3.8))
    for j, (action, colour) in enumerate(zip(actions, _colours(len(actions)), strict=True)):
        sub = rates[rates["action"] == action].set_index("method").reindex(methods)
        present = sub["rate"].notna().to_numpy()
        x = np.arange(len(methods)) - 0.4 + width * (j + 0.5)
        ax.bar(x[present], sub["rate"].to_numpy(dtype=float)[present], width * 0.95,
               yerr=_error_bars(sub.reset_index())[:, present], capsize=3, color=colour, label=action)
    if baseline is not None and baseline.get("rate") is not None:
        ax.axhline(float(baseline["rate"]), color="black", lw=1.2, ls="--", label="baseline")
        low, high = baseline.get("low"), baseline.get("high")
        if low is not None and high is not None:
            ax.axhspan(float(low), float(high), color="grey", alpha=0.15, lw=0)
    ax.set_xticks(range(len(methods)), methods)
    return _finish_rate_axes(fig, ax, ylabel, title)


def plot_rate_lines(rates: pd.DataFrame, x: str, series: Sequence[str], title: str = "", xlabel: str | None = None,
                    ylabel: str = "rate", baseline: Mapping | None = None, log_x: bool = False) -> Figure:
    """Rate against ``x`` with a shaded interval, one line per combination of the ``series`` columns.

    Used for the k-sweep (x = ``k``, series = method, action) and the steering curve (x = ``alpha``, series =
    condition, layer).

    Args:
        rates: Frame with ``x``, the ``series`` columns, ``rate`` and optionally ``low``/``high``.
        x: Column on the x axis.
        series: Columns whose value combinations define the lines.
        title: Figure title.
        xlabel: X-axis label (default: ``x``).
        ylabel: Y-axis label.
        baseline: Optional ``{"rate", "low", "high"}`` drawn as a horizontal line and band.
        log_x: Logarithmic x axis.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    groups = list(rates.groupby(list(series), sort=False, dropna=False))
    for (key, sub), colour in zip(groups, _colours(len(groups)), strict=True):
        sub = sub.sort_values(x)
        label = ", ".join(f"{s}={v}" if s in ("layer", "k") else str(v)
                          for s, v in zip(series, key if isinstance(key, tuple) else (key,), strict=True))
        xs = sub[x].to_numpy(dtype=float)
        ax.plot(xs, sub["rate"].to_numpy(dtype=float), marker="o", ms=3.5, color=colour, label=label)
        if "low" in sub and "high" in sub:
            low, high = sub["low"].to_numpy(dtype=float), sub["high"].to_numpy(dtype=float)
            ok = np.isfinite(low) & np.isfinite(high)
            if ok.any():
                ax.fill_between(xs[ok], low[ok], high[ok], color=colour, alpha=0.15, lw=0)
    if baseline is not None and baseline.get("rate") is not None:
        ax.axhline(float(baseline["rate"]), color="black", lw=1.2, ls="--", label="baseline")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    return _finish_rate_axes(fig, ax, ylabel, title)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
             title: str = "Attribution ROC (contaminated vs clean pairs)") -> Figure:
    """ROC curves, one per method.

    Args:
        curves: ``{method: (fpr [m], tpr [m], auroc)}``.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for (name, (fpr, tpr, auc)), colour in zip(curves.items(), _colours(len(curves)), strict=True):
        ax.plot(fpr, tpr, color=colour, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _cluster_colours(labels: Sequence[int], name: str, palette: str) -> tuple[pd.Series, dict]:
    """A colour per item from its cluster label, and the legend mapping label → colour."""
    uniq = sorted(set(int(v) for v in labels))
    cmap = plt.get_cmap(palette)
    lut = {c: cmap(i % cmap.N) for i, c in enumerate(uniq)}
    return pd.Series([lut[int(v)] for v in labels], name=name), lut


def plot_clustermap(matrix: pd.DataFrame, row_linkage: np.ndarray | None, col_linkage: np.ndarray | None,
                    row_clusters: Sequence[int], col_clusters: Sequence[int], title: str = "") -> Figure:
    """Clustered heatmap with dendrograms and cluster colour bars (seaborn ``clustermap``).

    Args:
        matrix: [rows, cols] cosines; rows are behaviour vectors, columns datapoints (labels are the ids).
        row_linkage: SciPy linkage of the rows, or ``None`` to keep the given row order without a dendrogram.
        col_linkage: SciPy linkage of the columns, or ``None`` to keep the given column order (used when columns
            were subsampled for display and already ordered by the full dendrogram).
        row_clusters: Cluster label per row.
        col_clusters: Cluster label per column.
        title: Figure title.
    """
    import seaborn as sns

    row_colours, row_lut = _cluster_colours(row_clusters, "behaviour cluster", "Set2")
    col_colours, col_lut = _cluster_colours(col_clusters, "pair cluster", "tab20")
    row_colours.index, col_colours.index = matrix.index, matrix.columns
    values = matrix.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    vmax = float(np.quantile(np.abs(finite), 0.99)) if finite.size else 1.0
    n_rows, n_cols = matrix.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # raised inside seaborn (Colormap.set_bad)
        grid = sns.clustermap(
            matrix, row_linkage=row_linkage, col_linkage=col_linkage,
            row_cluster=row_linkage is not None and n_rows > 1, col_cluster=col_linkage is not None and n_cols > 1,
            row_colors=row_colours, col_colors=col_colours, cmap="RdBu_r", center=0.0,
            vmin=-max(vmax, 1e-6), vmax=max(vmax, 1e-6),
            xticklabels=n_cols <= 60, yticklabels=n_rows <= 60, figsize=(10, 8),
            dendrogram_ratio=(0.12, 0.12), cbar_kws={"label": "cosine"},
        )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (*col_lut.values(), *row_lut.values())]
    names = [f"pairs {k}" for k in col_lut] + [f"behaviours {k}" for k in row_lut]
    grid.figure.legend(handles, names, title="clusters", fontsize=7, title_fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.0, 0.95), frameon=False)
    grid.ax_heatmap.set_xlabel("preference pairs")
    grid.ax_heatmap.set_ylabel("behaviour vectors (prompts)")
    if title:
        grid.figure.suptitle(title, y=1.02)
    return grid.figure

