"""Stability cut: cut a dendrogram at a different height in each branch.

A single cut height (a fixed number of clusters) must serve every branch of the tree at once. When one branch
holds a few large, loose groups and another a small, tight one, any single height either merges the tight group
into its neighbour or shatters the loose ones. The stability cut instead picks a set of disjoint subtrees, one
per cluster, each at the height where it stands out most, in the spirit of HDBSCAN's excess of mass (Campello,
Moulavi & Sander 2013) applied to a Ward or average-linkage tree.

For a node c with ``n_c`` leaves, merge height ``h_c`` and parent merge height ``h_parent``:

    stability(c) = n_c · log((h_parent + δ) / (h_c + δ))        δ = 1% of the root's height

A group that is tight inside (small ``h_c``) and far from everything else (large ``h_parent``) has a high
stability, and the score grows with the number of members it explains. Dynamic programming over the tree picks
the disjoint nodes of size ≥ ``min_size`` with the largest total stability: a node is kept whole when its own
stability beats the best its two subtrees can do apart. The root is never a cluster (it has no parent).

A node larger than ``max_size`` is never a cluster itself (HDBSCAN's ``max_cluster_size``): the root's merge is
usually far above every other, which weighs the score of its two children so heavily that they can outscore all
the structure inside them, and a cut into two halves of the items finds no behaviour.

Leaves under no chosen node (they sit in groups smaller than ``min_size``) are returned as 0; the caller assigns
them (``pairtrace.clustering.cluster_features`` gives each to the cluster with the nearest centroid).
"""

from __future__ import annotations

import numpy as np


def compute_stability_cut(z: np.ndarray, min_size: int, delta_fraction: float = 0.01,
                          max_size: int | None = None) -> tuple[np.ndarray, float]:
    """Choose disjoint subtrees of a linkage with the largest total stability.

    Args:
        z: SciPy linkage matrix ``[n-1, 4]`` (monotone heights: Ward or average linkage).
        min_size: Smallest number of leaves a cluster may have (≥ 1).
        delta_fraction: δ as a fraction of the root's merge height; keeps ratios finite at zero heights
            (identical items).
        max_size: Largest number of leaves a cluster may have (``None``: no limit).

    Returns:
        ``(labels [n], total)``: labels ``1..K`` for leaves under a chosen node (numbered in order of node id),
        0 for leaves under none; and the total stability of the chosen nodes.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    if max_size is not None and max_size < min_size:
        raise ValueError(f"max_size must be at least min_size ({min_size}), got {max_size}")
    n = len(z) + 1
    n_nodes = 2 * n - 1
    size = np.ones(n_nodes, dtype=np.int64)
    height = np.zeros(n_nodes)
    parent = np.full(n_nodes, -1, dtype=np.int64)
    children = np.asarray(z[:, :2], dtype=np.int64)  # [n-1, 2]
    for j in range(n - 1):
        node = n + j
        size[node], height[node] = int(z[j, 3]), float(z[j, 2])
        parent[children[j]] = node
    top = float(height[-1])
    delta = delta_fraction * top if top > 0 else 1e-12
    stability = np.zeros(n_nodes)
    eligible = (size >= min_size) & (parent >= 0)  # the root is never a cluster
    if max_size is not None:
        eligible &= size <= max_size
    stability[eligible] = size[eligible] * np.log((height[parent[eligible]] + delta) / (height[eligible] + delta))

    # best[v]: the largest total stability of disjoint chosen nodes within v's subtree; keep[v]: v itself is chosen.
    # Node ids grow from the leaves up, so one pass in id order sees children before parents.
    best = np.where(eligible, stability, 0.0)
    keep = eligible.copy()
    for j in range(n - 1):
        node = n + j
        apart = best[children[j, 0]] + best[children[j, 1]]
        if eligible[node] and stability[node] >= apart:
            best[node] = stability[node]
        else:
            best[node], keep[node] = apart, False

    labels = np.zeros(n, dtype=np.int64)
    chosen = 0
    stack = [n_nodes - 1]
    while stack:  # top-down: the first kept node on each path is a cluster
        node = stack.pop()
        if keep[node]:
            chosen += 1
            labels[_leaves(node, children, n)] = chosen
        elif node >= n:
            stack.extend(children[node - n].tolist())
    return labels, float(best[-1])


def _leaves(node: int, children: np.ndarray, n: int) -> list[int]:
    out, stack = [], [node]
    while stack:
        v = stack.pop()
        if v < n:
            out.append(v)
        else:
            stack.extend(children[v - n].tolist())
    return out
