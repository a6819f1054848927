"""Does bfloat16 extraction change the attribution? float32 vs bfloat16 datapoint vectors of a finished run.

Reads a finished ``pairtrace run`` folder (the organism's M0, its preference mix, the probe), extracts the
datapoint vectors at the run's layer twice in one process, in float32 and in bfloat16, and prints the seconds of
each, the cosine between the two vectors of every pair, the Spearman correlation of the two probe rankings, the
overlap of their top-k, and the AUROC of each against the organism's contaminated labels.

Run::

    .venv/bin/python benchmarks/bf16_agreement.py runs/organism --k 96
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from pairtrace.data.pairs import load_pairs
from pairtrace.models import load_model
from pairtrace.store import VectorStore
from pairtrace.vectors import compute_datapoint_vectors


def _unit_scores(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Cosine of each row with ``direction``; rows without a direction score -2 (below every cosine)."""
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(direction)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = vectors @ direction / norms
    return np.where(np.isfinite(scores), scores, -2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="finished run folder (organism/, vectors/, behaviour/)")
    parser.add_argument("--k", type=int, default=96, help="top-k whose overlap is printed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    layer = VectorStore.open(args.run / "vectors").layers[0]
    pairs = load_pairs(args.run / "organism" / "data" / "preference_mix.jsonl")
    probe = load_file(str(args.run / "behaviour" / "behaviour.safetensors"))["probe"][0].numpy()  # [d]
    with (args.run / "organism" / "data" / "labels.jsonl").open(encoding="utf-8") as fh:
        contaminated = {r["id"]: bool(r["contaminated"]) for r in map(json.loads, fh)}
    labels = np.array([contaminated[p.id] for p in pairs.pairs])

    vectors, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            loaded = load_model(args.run / "organism" / "m0", device="cpu", dtype=dtype)
            start = time.perf_counter()
            store = compute_datapoint_vectors(loaded, pairs, Path(tmp) / dtype, layers=layer, progress=False)
            vectors[dtype] = store.load(layer).numpy()  # [n, d]
            seconds[dtype] = time.perf_counter() - start

    full, half = vectors["float32"], vectors["bfloat16"]
    both = (np.linalg.norm(full, axis=1) > 0) & (np.linalg.norm(half, axis=1) > 0)
    cosine = (full * half).sum(1)[both] / (np.linalg.norm(full, axis=1) * np.linalg.norm(half, axis=1))[both]
    s_full, s_half = _unit_scores(full, probe), _unit_scores(half, probe)
    top_full, top_half = set(np.argsort(-s_full)[: args.k]), set(np.argsort(-s_half)[: args.k])
    print(f"{len(pairs.pairs)} pairs, layer {layer}, torch threads {torch.get_num_threads()}")
    print(f"extraction: float32 {seconds['float32']:.2f} s, bfloat16 {seconds['bfloat16']:.2f} s "
          f"({seconds['float32'] / seconds['bfloat16']:.2f}x)")
    print(f"vectors: cosine float32 vs bfloat16 min {cosine.min():.5f}, median {np.median(cosine):.6f} "
          f"({int((~both).sum())} pairs without a direction)")
    print(f"probe ranking: Spearman {spearmanr(s_full, s_half)[0]:.6f}, top-{args.k} overlap "
          f"{len(top_full & top_half)}/{args.k}")
    print(f"AUROC (contaminated): float32 {roc_auc_score(labels, s_full):.4f}, "
          f"bfloat16 {roc_auc_score(labels, s_half):.4f}")


if __name__ == "__main__":
    main()
