"""Figure helpers: every plot renders headless to PNG, with the expected number of bars / lines / cells."""

from __future__ import annotations

import base64

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.container import BarContainer
from scipy.cluster.hierarchy import linkage

from pairtrace.plots import (
    figure_to_png,
    plot_clustermap,
    plot_enrichment,
    plot_rate_bars,
    plot_rate_lines,
    plot_roc,
    png_data_uri,
    save_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


def test_rate_bars_draw_one_bar_per_method_and_action_with_baseline(tmp_path):
    rates = pd.DataFrame({"method": ["probe", "probe", "random", "random", "gradient"],
                          "action": ["filter", "switch", "filter", "switch", "filter"],
                          "rate": [0.03, 0.02, 0.07, 0.05, 0.06], "low": [0.01, 0.0, 0.05, 0.03, np.nan],
                          "high": [0.05, 0.04, 0.09, 0.07, np.nan]})
    fig = plot_rate_bars(rates, baseline={"rate": 0.076, "low": 0.06, "high": 0.09}, title="t")
    ax = fig.axes[0]
    bars = [bar for c in ax.containers if isinstance(c, BarContainer) for bar in c]
    assert len(bars) == 5  # gradient has no switch bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["probe", "random", "gradient"]
    assert any(np.allclose(line.get_ydata(), 0.076) for line in ax.get_lines())
    path = save_png(fig, tmp_path / "sub" / "bars.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_rate_lines_one_line_per_series_and_optional_band():
    frame = pd.DataFrame({"k": [10, 20, 40] * 2, "method": ["probe"] * 3 + ["random"] * 3,
                          "action": ["filter"] * 6, "rate": [0.05, 0.03, 0.01, 0.07, 0.07, 0.06],
                          "low": [0.04] * 6, "high": [0.08] * 6})
    fig = plot_rate_lines(frame, x="k", series=("method", "action"), baseline={"rate": 0.07})
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3  # two series + baseline
    assert len(ax.collections) == 2  # one interval band per series
    assert figure_to_png(fig).startswith(PNG_MAGIC)


def test_enrichment_bars_and_roc_and_data_uri():
    table = pd.DataFrame({"column": ["chosen_model", "source", "chosen_model"], "value": ["bad", "mix", "ok"],
                          "enrichment": [6.0, 1.2, 0.3], "count_top": [8, 3, 1], "p_value": [1e-8, 0.3, 1.0]})
    fig = plot_enrichment(table, top_n=2)
    assert len(fig.axes[0].patches) == 2
    png = figure_to_png(fig)
    uri = png_data_uri(png)
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
    roc = plot_roc({"probe": (np.array([0, 0.1, 1]), np.array([0, 0.9, 1]), 0.95)})
    assert "probe (AUROC 0.950)" in [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert figure_to_png(roc).startswith(PNG_MAGIC)


def test_clustermap_with_precomputed_linkages_and_colour_bars():
    rng = np.random.default_rng(0)
    matrix = pd.DataFrame(rng.normal(size=(6, 9)), index=[f"q{i}" for i in range(6)],
                          columns=[f"p{j}" for j in range(9)])
    rows, cols = linkage(matrix.to_numpy(), "ward"), linkage(matrix.to_numpy().T, "ward")
    fig = plot_clustermap(matrix, rows, cols, [1, 1, 2, 2, 3, 3], [1] * 4 + [2] * 5, title="x")
    heat = next(a for a in fig.axes if a.get_xlabel() == "preference pairs")
    assert heat.collections[0].get_array().size == 6 * 9
    # without a column linkage the given column order is kept
    fig2 = plot_clustermap(matrix, rows, None, [1] * 6, [1] * 9)
    assert figure_to_png(fig2).startswith(PNG_MAGIC) and figure_to_png(fig).startswith(PNG_MAGIC)
