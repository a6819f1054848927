"""Discovery's clustering rules compared on finished organism builds, without running anything again.

Every build of a ``benchmarks/robustness.py`` output folder keeps its discovery views (``discover/`` and
``discover/views/*``): the similarity matrix (``matrix.parquet``) and its columns (``pairs.parquet``). This script
clusters each view's columns again with each rule of ``--auto-k`` (:func:`pairtrace.clustering.cluster_features` on
the pairs' similarity profiles, as discovery does; the view's other settings as its ``summary.json`` records them),
scores the clusters against the build's ground truth exactly as the robustness benchmark does (a behaviour's best
cluster: the one holding most of its pairs; purity = its share of that cluster, decoys counted against it; the best
view per behaviour), and prints, per folder and rule, how many builds find every emerged behaviour at >= 80% purity
and recall (the robustness goal), per build the numbers, and the mean purity / recall / F1 per behaviour.

The emerged behaviours are the ones ``robustness.json`` lists for each build. With ``stability`` among the rules
(the rule before HDBSCAN), the ``saved`` column checks that the recut reproduces the verdicts the benchmark
wrote. Takes seconds per folder. Run::

    .venv/bin/python benchmarks/discovery_recut.py runs/robustness-amd
    .venv/bin/python benchmarks/discovery_recut.py runs/robustness-amd runs/robustness-epochs2 \
        --auto-k hdbscan stability gap
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from organism_variants import discovery_views
from pairtrace.clustering import AUTO_K, cluster_features
from pairtrace.discover_summaries import evaluate_clusters
from pairtrace.labels import load_labels
from robustness import GOALS, best_discovery_view, discovery_goal_met


def view_dirs(build_dir: Path) -> list[Path]:
    """A build's discovery views: the main one, then ``views/*`` in name order."""
    main = build_dir / "discover"
    return [main, *sorted(p for p in (main / "views").glob("*") if p.is_dir())]


def load_view(view: Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """The view's column ids, its ``[P, C]`` similarity matrix (columns in ``pairs.parquet`` order) and summary."""
    pairs = pd.read_parquet(view / "pairs.parquet")
    long = pd.read_parquet(view / "matrix.parquet")
    wide = long.pivot(index="prompt_id", columns="pair_id", values="cosine")
    ids = pairs["pair_id"].tolist()
    summary = json.loads((view / "summary.json").read_text())
    return ids, wide[ids].to_numpy(dtype=np.float64), summary


def recut_view(ids: list[str], sim: np.ndarray, summary: dict[str, Any], auto_k: str,
               labels: pd.DataFrame) -> dict[str, Any]:
    """One view clustered again with ``auto_k`` and scored: the ``discovery`` dict of ``results.json`` in small."""
    config = summary.get("config") or {}
    clustering = cluster_features(sim.T, method=config.get("linkage", "ward"), auto_k=auto_k,
                                  min_cluster_size=config.get("min_cluster_size"),
                                  max_cluster_fraction=config.get("max_cluster_fraction", 0.5))
    scored = evaluate_clusters(SimpleNamespace(pair_ids=ids, columns=clustering), labels)
    return {"labels": scored, "response_tokens": summary.get("response_tokens"), "n_clusters": clustering.n_clusters}


def score_build(build_dir: Path, emerged: list[str], auto_k: str, cache: dict[Path, Any]) -> dict[str, Any]:
    """Best view per emerged behaviour with one rule; ``ok``: all of them reach the robustness benchmark's goal.
    ``cache`` keeps each build's labels and views between rules."""
    if build_dir not in cache:
        cache[build_dir] = (load_labels(build_dir / "organism" / "data" / "labels.jsonl"),
                            [load_view(view) for view in view_dirs(build_dir)])
    labels, loaded = cache[build_dir]
    views = [recut_view(*view, auto_k, labels) for view in loaded]
    discovery = {**views[0], "views": views[1:]}
    best = {name: best_discovery_view(discovery_views(discovery, name)) for name in emerged}
    return {"best": best, "ok": discovery_goal_met(list(best.values())),
            "clusters": [v["n_clusters"] for v in views]}


def build_dir_of(root: Path, row: dict[str, Any]) -> Path:
    """The build's run folder: ``<root>/<build>`` when it is there, else the ``run_dir`` the row recorded."""
    here = root / row["build"]
    return here if (here / "discover").is_dir() else Path(row["run_dir"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="robustness.py output folders (with robustness.json).")
    parser.add_argument("--auto-k", nargs="+", default=["hdbscan", "stability"], choices=AUTO_K,
                        help="Clustering rules compared (default: hdbscan stability).")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    totals: dict[str, list[int]] = {k: [0, 0] for k in args.auto_k}
    per_behaviour: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for root in args.roots:
        rows = [r for r in json.loads((root / "robustness.json").read_text())["builds"] if r.get("discovery")]
        cache: dict[Path, Any] = {}
        passing = dict.fromkeys(args.auto_k, 0)
        print(f"\n## {root} ({len(rows)} builds with an emerged behaviour)\n")
        saved = "stability" in args.auto_k
        print("| build | " + " | ".join(args.auto_k) + (" | saved (stability) |" if saved else " |"))
        print("|---" * (len(args.auto_k) + 1 + saved) + "|")
        for row in rows:
            emerged = list(row["discovery"])
            cells = []
            for auto_k in args.auto_k:
                result = score_build(build_dir_of(root, row), emerged, auto_k, cache)
                passing[auto_k] += result["ok"]
                totals[auto_k][0] += result["ok"]
                totals[auto_k][1] += 1
                parts = []
                for name, best in result["best"].items():
                    p, r = (best["purity"], best["recall"]) if best else (0.0, 0.0)
                    per_behaviour.setdefault((auto_k, name), []).append((p, r))
                    parts.append(f"{name} {p:.0%} / {r:.0%}")
                cells.append(("✓ " if result["ok"] else "✗ ") + "; ".join(parts) + f" (clusters {result['clusters']})")
            verdict = (" | " + ("✓" if row.get("discovery_ok") else "✗")) if saved else ""
            print(f"| {row['build']} | " + " | ".join(cells) + verdict + " |")
        print("\n" + "; ".join(f"{k}: {n} of {len(rows)} builds" for k, n in passing.items())
              + f" find every emerged behaviour at >= {GOALS['discovery_purity']:.0%} purity and "
              f">= {GOALS['discovery_recall']:.0%} recall")
    print("\n## All folders\n")
    names = sorted({b for _, b in per_behaviour})
    print("| rule | builds passing | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for auto_k in args.auto_k:
        cells = []
        for name in names:
            v = np.array(per_behaviour.get((auto_k, name), []))
            if not len(v):
                cells.append("")
                continue
            f1 = np.where(v.sum(1) > 0, 2 * v[:, 0] * v[:, 1] / np.maximum(v.sum(1), 1e-12), 0.0)
            at_goal = int(((v[:, 0] >= GOALS["discovery_purity"]) & (v[:, 1] >= GOALS["discovery_recall"])).sum())
            cells.append(f"purity {v[:, 0].mean():.2f}, recall {v[:, 1].mean():.2f}, F1 {f1.mean():.2f}; "
                         f"{at_goal} of {len(v)} at the goal")
        print(f"| {auto_k} | {totals[auto_k][0]} of {totals[auto_k][1]} | " + " | ".join(cells) + " |")
    print(f"\nWall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
