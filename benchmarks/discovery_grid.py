"""How well can the pairs of a finished run be clustered into its planted behaviours? A grid over clusterings.

Reads the behaviour × pair cosine matrix that ``pairtrace run`` (or ``pairtrace discover``) saved, and the
organism's ground-truth labels, and prints, for Ward clusterings of the pairs at several cluster counts and on
three feature choices (and, in the rows marked ``hdbscan`` and ``stab``, discovery's default clustering and the
stability cut), the
cluster holding most of each planted behaviour: its purity (share of its members that
carry the behaviour) and recall (share of the behaviour's pairs inside it). The acceptance of discovery asks for
≥ 80% / ≥ 80% on the contaminated slice. The last line is an upper bound that no unsupervised method can beat: a
logistic probe trained on the labels (5-fold cross-validation) on the datapoint vectors themselves.

Run::

    .venv/bin/python benchmarks/discovery_grid.py runs/organism
    .venv/bin/python benchmarks/discovery_grid.py runs/organism --view first-4-tokens
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from pairtrace.clustering import cluster_features


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def features(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """The pair features compared: [n_pairs, n_prompts] cosine profiles, as saved and re-scaled two ways."""
    return {
        "profile": _unit_rows(matrix),
        "row-centred": _unit_rows(matrix - matrix.mean(1, keepdims=True)),
        "column-standardised": _unit_rows((matrix - matrix.mean(0)) / matrix.std(0).clip(1e-9)),
    }


def best_cluster(clusters: np.ndarray, members: np.ndarray) -> tuple[float, float, int]:
    """(purity, recall, size) of the cluster that holds most of ``members``."""
    counts = Counter(clusters[members])
    cluster, hits = counts.most_common(1)[0]
    size = int((clusters == cluster).sum())
    return hits / size, hits / int(members.sum()), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="Run folder with discover/ and organism/data/labels.jsonl.")
    parser.add_argument("--clusters", type=int, nargs="+", default=[4, 6, 8, 12, 20])
    parser.add_argument("--view", help="A further discovery view (discover/views/VIEW), e.g. first-4-tokens.")
    args = parser.parse_args()

    folder = args.run / "discover" / "views" / args.view if args.view else args.run / "discover"
    long = pd.read_parquet(folder / "matrix.parquet")
    matrix = long.pivot(index="pair_id", columns="prompt_id", values="cosine")
    labels = {}
    with (args.run / "organism" / "data" / "labels.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            labels[record["id"]] = record
    behaviour = np.array([labels[i]["behaviour"] for i in matrix.index])
    planted = sorted({r["behaviour"] for r in labels.values()} - {"clean"})
    print(f"{len(matrix)} pairs x {matrix.shape[1]} behaviour vectors; planted: "
          + ", ".join(f"{b} ({int((behaviour == b).sum())})" for b in planted))
    print(f"{'features':<20} {'k':>9}  " + "  ".join(f"{b + ' purity/recall':>34}" for b in planted))
    for name, x in features(matrix.to_numpy()).items():
        tree = linkage(x, "ward")
        cuts = [(str(k), fcluster(tree, k, "maxclust")) for k in args.clusters]
        for rule, short in (("hdbscan", "hdbscan"), ("stability", "stab")):
            found = cluster_features(x, auto_k=rule)
            cuts.append((f"{short} ({found.n_clusters})", found.labels))
        for label, clusters in cuts:
            cells = []
            for b in planted:
                if not (behaviour == b).any():
                    cells.append("no direction")
                    continue
                purity, recall, size = best_cluster(clusters, behaviour == b)
                cells.append(f"{purity:>8.0%} / {recall:>4.0%} (size {size:>4})")
            print(f"{name:<20} {label:>9}  " + "  ".join(f"{c:>34}" for c in cells))

    from pairtrace.store import VectorStore

    store = VectorStore.open(folder / "vectors" if args.view else args.run / "vectors")
    layer = json.loads((args.run / "discover" / "summary.json").read_text(encoding="utf-8"))["layer"]
    vectors = store.load(layer).numpy()
    ids = store.ids
    keep = np.isfinite(vectors).all(1) & (np.abs(vectors).sum(1) > 0)
    y = np.array([labels[i]["contaminated"] for i in ids])[keep]
    scores = cross_val_predict(LogisticRegression(C=10, max_iter=2000), _unit_rows(vectors[keep]), y, cv=5,
                               method="predict_proba")[:, 1]
    top = np.argsort(-scores)[: int(y.sum())]
    print(f"supervised upper bound (logistic probe on the layer-{layer} datapoint vectors, 5-fold): "
          f"AUROC {roc_auc_score(y, scores):.3f}, precision at the contaminated count {y[top].mean():.0%}")


if __name__ == "__main__":
    main()
