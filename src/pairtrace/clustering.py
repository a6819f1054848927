"""Clustering of discovery's rows and columns (density-based HDBSCAN, or a hierarchical tree, Ward or average
linkage, cut at a fixed count, a height, by the stability cut or by an automatic rule), and the co-clustering of a
similarity matrix (:func:`discover_clusters`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform

from pairtrace.attribute import unit_rows
from pairtrace.discover_matrix import PromptResponses, compute_similarity
from pairtrace.errors import DataError
from pairtrace.tree_cut import compute_stability_cut

if TYPE_CHECKING:
    from pairtrace.discover import DiscoverConfig

LINKAGES = ("ward", "average")
AUTO_K = ("hdbscan", "stability", "gap", "calinski_harabasz", "silhouette")


@dataclass
class Clustering:
    """One hierarchical clustering.

    Attributes:
        linkage: SciPy linkage matrix ``[n-1, 4]`` (``None`` for fewer than two items).
        labels: Cluster per item, ``1..n_clusters``.
        n_clusters: Number of clusters.
        criterion: ``"fixed"``, ``"distance_threshold"``, ``"hdbscan"``, ``"stability"``, ``"gap"``,
            ``"calinski_harabasz"``, ``"silhouette"`` or ``"trivial"``.
        silhouette: Silhouette score of the chosen cut (``None`` for a single cluster), reported in every case.
        scores: Score of each candidate k (automatic choice only; for the stability cut, the chosen k's total
            stability).
        noise_share: HDBSCAN only: the share of items it called noise, before :func:`cluster_noise` placed them
            (much noise: the features hold few dense groups; compare ``auto_k="stability"``).
    """

    linkage: np.ndarray | None
    labels: np.ndarray
    n_clusters: int
    criterion: str
    silhouette: float | None = None
    scores: dict[int, float] = field(default_factory=dict)
    noise_share: float | None = None


def unit_features(x: np.ndarray) -> np.ndarray:
    """L2-normalised rows; rows without a direction become zeros."""
    units, ok = unit_rows(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    units[~ok] = 0.0
    return units.numpy().astype(np.float64)


def _cosine_distance(units: np.ndarray) -> np.ndarray:
    dist = np.clip(1.0 - units @ units.T, 0.0, 2.0)  # [n, n]
    np.fill_diagonal(dist, 0.0)
    return dist


DEFAULT_MAX_CLUSTER_FRACTION = 0.5
"""The stability cut's largest cluster, as a share of the items: on the organism, a build whose every-token view
the cut split into two halves of the mix (the sign-off pairs 24% of one) finds the sign-off as one cluster with it
(docs/discovery.md), and the default builds' clusters, all under half of the items, do not change."""


def cluster_features(x: np.ndarray, method: str = "ward", n_clusters: int | None = None,
                     distance_threshold: float | None = None, max_clusters: int = 10, seed: int = 0,
                     auto_k: str = "hdbscan", silhouette_sample: int = 3000,
                     min_cluster_size: int | None = None,
                     max_cluster_fraction: float | None = DEFAULT_MAX_CLUSTER_FRACTION) -> Clustering:
    """Clustering of rows, with a fixed, thresholded or automatically chosen number of clusters.

    ``auto_k="hdbscan"`` (default) finds the dense groups of the unit features (scikit-learn's HDBSCAN, excess of
    mass, at least ``min_cluster_size`` items, :data:`HDBSCAN_MIN_SAMPLES` neighbours for the density estimate);
    the items it calls noise are clustered among themselves by the stability cut (:func:`cluster_noise`). The
    tree (Ward or average linkage) is still built: it orders the labels along its leaves and draws the heatmap's
    dendrograms.
    ``auto_k="stability"`` cuts each branch of the tree at its own height (:mod:`pairtrace.tree_cut`): the
    disjoint subtrees of at least ``min_cluster_size`` items that are tightest inside and farthest from the
    rest, weighted by size; items in smaller groups join the cluster with the nearest centroid. It does not use
    ``max_clusters``. The other rules consider every k in ``2..max_clusters`` and keep the k with the best score:

    - ``gap`` (default): the largest relative jump between consecutive merge heights, (h_{n-k+1} + δ) /
      (h_{n-k} + δ) with δ = 1% of the top merge height: cut where merging further would join groups that are
      much farther apart than anything merged so far;
    - ``calinski_harabasz``: between- over within-cluster dispersion of the unit features;
    - ``silhouette``: Euclidean on unit features for Ward, cosine distance for average linkage.

    Args:
        x: ``[n, f]`` features (normalised here: Ward on unit rows, average linkage on cosine distance).
        method: ``ward`` or ``average``.
        n_clusters: Fixed number of clusters.
        distance_threshold: Cut height (``fcluster`` criterion ``distance``).
        max_clusters: Largest k tried by the automatic choice.
        seed: Seed of the silhouette subsample.
        auto_k: ``hdbscan``, ``stability``, ``gap``, ``calinski_harabasz`` or ``silhouette``.
        silhouette_sample: Largest number of items the silhouette score is computed on.
        min_cluster_size: Smallest cluster of HDBSCAN (default :func:`default_density_min_cluster_size`) or of the
            stability cut (default :func:`default_min_cluster_size`).
        max_cluster_fraction: Largest cluster of HDBSCAN or the stability cut, as a share of the items (rounded
            up, never below ``min_cluster_size``); ``None``: no limit.

    Returns:
        The clustering (labels ``1..K`` in order of first appearance along the dendrogram's leaves).
    """
    from sklearn.metrics import calinski_harabasz_score

    n = len(x)
    if n < 2:
        return Clustering(None, np.ones(n, dtype=np.int64), min(n, 1), "trivial")
    units = unit_features(x)
    if method == "ward":
        z = linkage(units, method="ward", metric="euclidean")
        dist = None
    else:
        dist = _cosine_distance(units)
        z = linkage(squareform(dist, checks=False), method="average")
    scores: dict[int, float] = {}
    noise_share = None
    if n_clusters is not None:
        labels, criterion = fcluster(z, t=min(n_clusters, n), criterion="maxclust"), "fixed"
    elif distance_threshold is not None:
        labels, criterion = fcluster(z, t=distance_threshold, criterion="distance"), "distance_threshold"
    elif n < 3:
        labels, criterion = np.ones(n, dtype=np.int64), "trivial"
    elif auto_k == "hdbscan":
        size = default_density_min_cluster_size(n) if min_cluster_size is None else min_cluster_size
        largest = _largest_cluster(size, max_cluster_fraction, n)
        labels, noise_share = density_labels(units, size, largest)
        labels = cluster_noise(units, labels, size, largest)
        if labels.max() < 1:
            labels, criterion = np.ones(n, dtype=np.int64), "trivial"
        else:
            criterion = "hdbscan"
    elif auto_k == "stability":
        size = default_min_cluster_size(n) if min_cluster_size is None else min_cluster_size
        labels, total = compute_stability_cut(z, size, max_size=_largest_cluster(size, max_cluster_fraction, n))
        if labels.max() < 1:
            labels, criterion = np.ones(n, dtype=np.int64), "trivial"
        else:
            labels, criterion = _assign_to_nearest_centroid(units, labels), "stability"
            scores[len(np.unique(labels))] = total
    else:
        best = None
        for k in range(2, min(max_clusters, n - 1) + 1):
            cand = fcluster(z, t=k, criterion="maxclust")
            found = len(np.unique(cand))
            if found < 2 or found in scores:
                continue
            if auto_k == "silhouette":
                score = _silhouette(units, dist, cand, silhouette_sample, seed)
            elif auto_k == "gap":
                score = _height_gap(z[:, 2], k)
            else:
                score = float(calinski_harabasz_score(units, cand))
            scores[found] = score
            if best is None or score > best[0] + 1e-12:
                best = (score, cand)
        labels, criterion = (best[1], auto_k) if best is not None else (np.ones(n, dtype=np.int64), "trivial")
    labels = _relabel_in_leaf_order(np.asarray(labels), z)
    k = len(np.unique(labels))
    sil = _silhouette(units, dist, labels, silhouette_sample, seed) if 1 < k < n else None
    return Clustering(z, labels, k, criterion, sil, scores, noise_share)


HDBSCAN_MIN_SAMPLES = 3
"""Neighbours behind HDBSCAN's density estimate (its ``min_samples``): small, so that a group of near-identical
pairs is dense, while the smallest cluster is set by ``min_cluster_size`` alone."""

DENSITY_MIN_CLUSTER_FRACTION = 0.04
"""HDBSCAN's smallest cluster, as a share of the items (:func:`default_density_min_cluster_size`)."""


def default_density_min_cluster_size(n: int) -> int:
    """Smallest cluster of HDBSCAN for ``n`` items: 4% of them, at least 5 (docs/discovery.md: on 28 organism
    builds 4–5% find the planted behaviours most often, 3% and 6% less often)."""
    return max(5, math.ceil(DENSITY_MIN_CLUSTER_FRACTION * n))


def density_labels(units: np.ndarray, min_cluster_size: int,
                   max_cluster_size: int | None = None) -> tuple[np.ndarray, float]:
    """HDBSCAN on unit features.

    Args:
        units: ``[n, f]`` L2-normalised features (Euclidean distance between them is monotone in cosine).
        min_cluster_size: Smallest cluster.
        max_cluster_size: Largest cluster (``None``: no limit).

    Returns:
        ``(labels, noise_share)``: labels ``1..K`` with 0 for noise (all 0 when no group is dense enough or there
        are too few items), and the share of items labelled noise.
    """
    from sklearn.cluster import HDBSCAN

    n = len(units)
    if n < max(min_cluster_size, 2) or n <= HDBSCAN_MIN_SAMPLES:
        return np.zeros(n, dtype=np.int64), 1.0
    found = HDBSCAN(min_cluster_size=max(min_cluster_size, 2), min_samples=HDBSCAN_MIN_SAMPLES,
                    max_cluster_size=max_cluster_size, copy=True).fit_predict(units)  # [n], -1 = noise
    labels = found.astype(np.int64) + 1
    return labels, float(np.mean(labels == 0))


def _largest_cluster(min_cluster_size: int, max_cluster_fraction: float | None, n: int) -> int | None:
    """The largest cluster allowed among ``n`` items: the share rounded up, never below the smallest cluster."""
    return None if max_cluster_fraction is None else max(min_cluster_size, math.ceil(max_cluster_fraction * n))


def cluster_noise(units: np.ndarray, labels: np.ndarray, min_cluster_size: int,
                  max_cluster_size: int | None = None) -> np.ndarray:
    """Give HDBSCAN's noise items clusters of their own, by the stability cut of their Ward tree.

    Noise is not one group: it holds what is too sparse for HDBSCAN, planted groups among them (spread out by
    sampling noise, or cut off by ``max_cluster_size``). Joining every noise item to the nearest dense cluster
    would merge such a group into an unrelated one; this cuts the noise items' own tree instead, with the same
    smallest cluster, and only the items left over (and noise without a group of that size) join the nearest
    cluster.

    Args:
        units: ``[n, f]`` unit features.
        labels: HDBSCAN's labels, ``1..K`` and 0 for noise.
        min_cluster_size: Smallest cluster among the noise items.
        max_cluster_size: Largest cluster among them (``None``: no limit).

    Returns:
        Labels ``1..K'``: the dense clusters keep their labels, the noise clusters follow; all 0 only when there
        is neither a dense cluster nor a group of noise items of the smallest size.
    """
    noise = np.flatnonzero(labels == 0)
    size = max(min_cluster_size, 2)
    out = labels.copy()
    if len(noise) >= size:
        tree = linkage(units[noise], method="ward", metric="euclidean")
        largest = None if max_cluster_size is None else max(size, max_cluster_size)
        own, _ = compute_stability_cut(tree, size, max_size=largest)  # [len(noise)], 0: in no group of that size
        out[noise[own > 0]] = own[own > 0] + labels.max()
    return _assign_to_nearest_centroid(units, out) if out.max() > 0 else out


def default_min_cluster_size(n: int) -> int:
    """Smallest cluster of the stability cut for ``n`` items: 1% of them, at least 2 and at most 10."""
    return int(min(10, max(2, math.ceil(0.01 * n))))


def _assign_to_nearest_centroid(units: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Give each item labelled 0 the label of the cluster whose mean unit feature is nearest (cosine)."""
    orphans = labels == 0
    if not orphans.any():
        return labels
    ids = np.unique(labels[~orphans])
    centroids = np.stack([units[labels == c].mean(axis=0) for c in ids])  # [K, f]
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    out = labels.copy()
    out[orphans] = ids[np.argmax(units[orphans] @ centroids.T, axis=1)]
    return out


def _height_gap(heights: np.ndarray, k: int) -> float:
    """Relative jump between the merge that would leave k−1 clusters and the one that left k."""
    heights = np.sort(heights)  # [n-1] ascending (Ward and average linkage are monotone)
    n = len(heights) + 1
    delta = 0.01 * float(heights[-1]) if heights[-1] > 0 else 1e-12
    return float((heights[n - k] + delta) / (heights[n - k - 1] + delta))


def _silhouette(units, dist, labels, sample: int, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    size = min(sample, len(labels)) if len(labels) > sample else None
    if dist is not None:
        return float(silhouette_score(dist, labels, metric="precomputed", sample_size=size, random_state=seed))
    return float(silhouette_score(units, labels, metric="euclidean", sample_size=size, random_state=seed))


def _relabel_in_leaf_order(labels: np.ndarray, z: np.ndarray) -> np.ndarray:
    order = leaves_list(z)
    mapping: dict[int, int] = {}
    for i in order:
        mapping.setdefault(int(labels[i]), len(mapping) + 1)
    return np.array([mapping[int(v)] for v in labels], dtype=np.int64)


def clustering_info(c: Clustering) -> dict[str, Any]:
    """A clustering as summary.json reports it: cluster count, criterion, silhouette, scores by k, HDBSCAN's noise
    share, sizes."""
    return {"n_clusters": c.n_clusters, "criterion": c.criterion, "silhouette": c.silhouette,
            "score_by_k": {str(k): round(v, 4) for k, v in c.scores.items()},
            "noise_share": None if c.noise_share is None else round(c.noise_share, 4),
            "sizes": [int((c.labels == i).sum()) for i in range(1, c.n_clusters + 1)]}


@dataclass
class Discovery:
    """The similarity matrix and its co-clustering.

    Attributes:
        prompts: Behaviour prompts, in row order.
        pair_ids: Pair ids, in column order.
        similarity: ``[P, C]`` cosines.
        rows: Clustering of the behaviour vectors.
        columns: Clustering of the pairs.
        block_means: ``[row clusters, column clusters]`` mean cosine of each block.
        behaviour_vectors: ``[P, d]``.
        datapoint_vectors: ``[C, d]``.
    """

    prompts: list[PromptResponses]
    pair_ids: list[str]
    similarity: np.ndarray
    rows: Clustering
    columns: Clustering
    block_means: np.ndarray
    behaviour_vectors: torch.Tensor
    datapoint_vectors: torch.Tensor


def discover_clusters(prompts: Sequence[PromptResponses], behaviour: torch.Tensor, pair_ids: Sequence[str],
                      datapoints: torch.Tensor, config: DiscoverConfig) -> Discovery:
    """Similarity matrix and co-clustering of behaviour vectors and datapoint vectors (no model, no labels).

    Args:
        prompts: The behaviour prompts (row order).
        behaviour: ``[P, d]`` behaviour vectors.
        pair_ids: Column ids.
        datapoints: ``[C, d]`` datapoint vectors.
        config: Linkage, number of clusters, features of the pair clustering.

    Returns:
        The discovery, cluster labels ordered along the dendrograms.
    """
    if len(prompts) != len(behaviour):
        raise DataError(f"{len(prompts)} prompts but {len(behaviour)} behaviour vectors")
    if len(pair_ids) != len(datapoints):
        raise DataError(f"{len(pair_ids)} pair ids but {len(datapoints)} datapoint vectors")
    if len(prompts) == 0:
        raise DataError("no behaviour vectors: M0 and M1 responded identically to every prompt")
    if len(pair_ids) == 0:
        raise DataError("no datapoint vector has a direction: every chosen response equals its rejected one")
    sim = compute_similarity(behaviour, datapoints)  # [P, C]
    options = {"method": config.linkage, "n_clusters": config.n_clusters,
               "distance_threshold": config.distance_threshold, "max_clusters": config.max_clusters,
               "seed": config.seed, "auto_k": config.auto_k,
               "min_cluster_size": config.min_cluster_size, "max_cluster_fraction": config.max_cluster_fraction}
    rows = cluster_features(behaviour.numpy(), **options)
    pair_features = sim.T if config.cluster_pairs_on == "profile" else datapoints.numpy()
    columns = cluster_features(pair_features, **options)
    blocks = np.zeros((rows.n_clusters, columns.n_clusters))
    for a in range(rows.n_clusters):
        for b in range(columns.n_clusters):
            blocks[a, b] = sim[np.ix_(rows.labels == a + 1, columns.labels == b + 1)].mean()
    return Discovery(list(prompts), list(pair_ids), sim, rows, columns, blocks, behaviour, datapoints)
