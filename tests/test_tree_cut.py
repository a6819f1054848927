"""The stability cut: a different cut height per branch, chosen by dynamic programming over the tree."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage
from sklearn.metrics import adjusted_rand_score

from pairtrace.clustering import cluster_features, default_min_cluster_size
from pairtrace.tree_cut import compute_stability_cut


def three_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two loose groups of 40 and a tight group of 8, well apart."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(40, 2)) + np.array([0.0, 0.0])
    b = rng.normal(size=(40, 2)) + np.array([20.0, 0.0])
    tight = 0.05 * rng.normal(size=(8, 2)) + np.array([10.0, 15.0])
    return np.concatenate([a, b, tight]), np.repeat([0, 1, 2], [40, 40, 8])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stability_cut_keeps_loose_groups_whole_and_separates_a_tight_one(seed):
    x, truth = three_groups(seed)
    labels, total = compute_stability_cut(linkage(x, method="ward"), min_size=5)
    assert total > 0 and labels.min() >= 1  # every leaf is under a chosen node here
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)


def test_stability_cut_is_the_best_set_of_disjoint_subtrees():
    """The dynamic programme against every antichain of a small tree."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3))
    z = linkage(x, method="ward")
    n = len(x)
    leaves = {i: frozenset([i]) for i in range(n)}
    height = {i: 0.0 for i in range(n)}
    parent = {}
    for j, (a, b, h, _) in enumerate(z):
        leaves[n + j] = leaves[int(a)] | leaves[int(b)]
        height[n + j] = h
        parent[int(a)] = parent[int(b)] = n + j
    delta = 0.01 * z[-1, 2]
    for min_size, max_size in ((1, None), (2, None), (3, None), (1, 4), (2, 3)):
        nodes = [v for v in parent if min_size <= len(leaves[v]) <= (max_size or n)]
        stability = {v: len(leaves[v]) * np.log((height[parent[v]] + delta) / (height[v] + delta)) for v in nodes}
        best = 0.0
        for r in range(1, len(nodes) + 1):
            for chosen in itertools.combinations(nodes, r):
                sets = [leaves[v] for v in chosen]
                if sum(map(len, sets)) == len(frozenset().union(*sets)):  # disjoint
                    best = max(best, sum(stability[v] for v in chosen))
        labels, total = compute_stability_cut(z, min_size, max_size=max_size)
        assert total == pytest.approx(best)
        chosen_sizes = np.bincount(labels)[1:]
        assert (chosen_sizes >= min_size).all() and (chosen_sizes <= (max_size or n)).all()


def test_stability_cut_edge_cases():
    z = linkage(np.zeros((6, 2)) + np.repeat([[0.0, 0.0], [1.0, 1.0]], 3, axis=0), method="ward")
    labels, total = compute_stability_cut(z, min_size=2)  # identical items: zero heights stay finite
    assert np.isfinite(total) and sorted(np.bincount(labels)[1:].tolist()) == [3, 3]
    labels, _ = compute_stability_cut(z, min_size=6)  # only the root is that large, and it is never a cluster
    assert (labels == 0).all()
    with pytest.raises(ValueError, match="min_size"):
        compute_stability_cut(z, min_size=0)
    with pytest.raises(ValueError, match="max_size"):
        compute_stability_cut(z, min_size=3, max_size=2)


def test_a_cut_into_two_halves_is_refused_and_the_groups_inside_found():
    """Far apart, two halves outscore the groups inside the larger one; no cluster above half the items."""
    rng = np.random.default_rng(0)
    e = np.eye(8)
    big = [e[0] + 0.3 * e[1] + 0.1 * rng.normal(size=(35, 8)), e[0] + 0.3 * e[2] + 0.1 * rng.normal(size=(35, 8))]
    small = e[5] + 0.1 * rng.normal(size=(50, 8))
    x = np.concatenate([*big, small])
    truth = np.repeat([0, 1, 2], [35, 35, 50])
    halves = cluster_features(x, auto_k="stability", min_cluster_size=5, max_cluster_fraction=None)
    assert halves.n_clusters == 2 and sorted(np.bincount(halves.labels)[1:].tolist()) == [50, 70]
    capped = cluster_features(x, auto_k="stability", min_cluster_size=5)  # the default: at most half of the items
    assert (np.bincount(capped.labels)[1:] <= 60).all()
    assert adjusted_rand_score(truth, capped.labels) == pytest.approx(1.0)


def test_cluster_features_stability_assigns_small_groups_to_the_nearest_cluster():
    rng = np.random.default_rng(0)
    axes = 5 * np.eye(8)
    x = np.concatenate([axes[0] + rng.normal(size=(40, 8)), axes[1] + rng.normal(size=(40, 8)),
                        axes[2] + 0.05 * rng.normal(size=(8, 8))])  # directions: features are L2-normalised
    truth = np.repeat([0, 1, 2], [40, 40, 8])
    outlier = axes[3:4] + 2 * axes[0:1]  # alone in its direction (a group below min_cluster_size), nearest to 0
    result = cluster_features(np.concatenate([x, outlier]), auto_k="stability", min_cluster_size=5)
    assert result.criterion == "stability" and result.n_clusters == 3
    assert (np.bincount(result.labels)[1:] >= 5).all()
    assert adjusted_rand_score(truth, result.labels[:-1]) == pytest.approx(1.0)
    assert result.labels[-1] == result.labels[0]
    # too few items for any cluster of the minimum size: one cluster
    assert cluster_features(x[:6], auto_k="stability", min_cluster_size=5).n_clusters == 1


@pytest.mark.parametrize(("n", "expected"), [(3, 2), (150, 2), (550, 6), (5000, 10)])
def test_default_min_cluster_size(n, expected):
    assert default_min_cluster_size(n) == expected
