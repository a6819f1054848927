"""Where does a pair's behaviour live in the response? Datapoint vectors pooled over the first N response tokens.

The method (paper Def. 3.2) averages layer-k activations over every response token. On the organism a compliance
that follows the distractors is a text rewritten letter by letter ("Sur3, h3r3 is..."), and the mean over it is
dominated by the rewrite, which the clean ``benign_format`` pairs share. The choice between a compliance and a
refusal is made at the first response tokens. This script recomputes the datapoint vectors and the probe of a
finished run with the mean taken over the first N response tokens only (in a causal model those positions do not
see the later tokens, so this is the same as cutting the response after N tokens) and prints, per N, the probe's
AUROC and precision at the contaminated count, and the best Ward cluster of the contaminated slice (purity /
recall, cluster size) on the L2-normalised datapoint vectors at several cluster counts. No labels are used to
build anything; they only score the result. Pooling over a response's head is not a pipeline option (yet): this
measures whether it should be.

Run::

    .venv/bin/python benchmarks/response_pooling.py runs/organism
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.metrics import roc_auc_score

from discovery_grid import best_cluster  # same folder: the script's directory is on sys.path
from pairtrace.activations import compute_means_from_teacher_forced
from pairtrace.behaviour import load_triples
from pairtrace.data.pairs import load_pairs
from pairtrace.models import TeacherForced, build_teacher_forcing, load_model


def keep_head(items: list[TeacherForced], n_tokens: int | None) -> list[TeacherForced]:
    """The same sequences cut after their first ``n_tokens`` response tokens (``None``: unchanged)."""
    if n_tokens is None:
        return items
    out = []
    for it in items:
        end = min(it.response_end, it.response_start + n_tokens)
        out.append(replace(it, input_ids=it.input_ids[:end], response_end=end))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="A finished `pairtrace run` folder on the built-in organism.")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="Response tokens pooled (the full mean is always included).")
    parser.add_argument("--clusters", type=int, nargs="+", default=[4, 8, 12, 20])
    parser.add_argument("--layer", type=int, default=None, help="Layer (default: the run's attribution layer).")
    args = parser.parse_args()

    results = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
    layer = args.layer if args.layer is not None else int(results["layer"])
    max_length = int(results["config"]["attribution"].get("max_length") or 2048)
    m0 = load_model(args.run / "organism" / "m0", device="cpu")
    pairs = load_pairs(args.run / "organism" / "data" / "preference_mix.jsonl")
    labels = {}
    with (args.run / "organism" / "data" / "labels.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            labels[record["id"]] = record
    contaminated = np.array([labels[p.id]["contaminated"] for p in pairs])
    triples = load_triples(args.run / "behaviour" / "triples.jsonl")
    full = {
        "chosen": build_teacher_forcing(m0, [p.prompt for p in pairs], [p.chosen for p in pairs], max_length),
        "rejected": build_teacher_forcing(m0, [p.prompt for p in pairs], [p.rejected for p in pairs], max_length),
        "r1": build_teacher_forcing(m0, [t.prompt for t in triples], [t.r1 for t in triples], max_length),
        "r0": build_teacher_forcing(m0, [t.prompt for t in triples], [t.r0 for t in triples], max_length),
    }
    print(f"{len(pairs)} pairs ({int(contaminated.sum())} contaminated), {len(triples)} probe triples, layer {layer}")
    print(f"{'pooled':>10} {'AUROC':>6} {'P@' + str(int(contaminated.sum())):>5}  "
          + "  ".join(f"{'k=' + str(k) + ' purity/recall (size)':>26}" for k in args.clusters))
    for head in [None, *args.heads]:
        means = {name: compute_means_from_teacher_forced(m0, keep_head(items, head), [layer], progress=False)[:, 0]
                 .numpy() for name, items in full.items()}
        vectors = means["chosen"] - means["rejected"]  # [n, d] datapoint vectors
        norms = np.linalg.norm(vectors, axis=1)
        has_direction = np.isfinite(norms) & (norms > 0)
        units = vectors / np.where(has_direction, norms, 1.0)[:, None]
        probe = np.nanmean(means["r1"], 0) - np.nanmean(means["r0"], 0)  # [d]
        cosines = units @ (probe / np.linalg.norm(probe))
        scores = np.where(has_direction, cosines, cosines[has_direction].min() - 1.0)  # no direction: ranked last
        top = np.argsort(-scores)[: int(contaminated.sum())]
        tree = linkage(units[has_direction], "ward")
        cells = []
        for k in args.clusters:
            purity, recall, size = best_cluster(fcluster(tree, k, "maxclust"), contaminated[has_direction])
            cells.append(f"{purity:>9.0%} / {recall:>4.0%} ({size:>4})")
        name = "all" if head is None else f"first {head}"
        print(f"{name:>10} {roc_auc_score(contaminated, scores):>6.3f} {contaminated[top].mean():>5.0%}  "
              + "  ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
