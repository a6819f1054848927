"""Discovery: find behaviours nobody was looking for, and the preference pairs that taught them.

1. **Behaviours.** From M0 and M1 generations on a broad prompt set, keep the prompts whose M0 and M1 responses
   differ (as sets of whitespace-normalised texts) and build one behaviour vector per prompt (paper Def. 3.1):
   v_p = mean ā(p, r; M0, k) over M1's responses − mean ā(p, r; M0, k) over M0's responses (both teacher-forced
   through M0, like the datapoint vectors).
2. **Similarity.** S[p, d] = cos(v_p, v_d) for every pair d, or for the union of each prompt's top-K pairs.
3. **Co-clustering.** Rows (behaviour vectors) are clustered on the vectors themselves; columns (pairs) on their
   *similarity profiles* S[:, d] across behaviour vectors (the default; ``cluster_pairs_on="vector"`` clusters
   the datapoint vectors instead). Both use SciPy hierarchical clustering: Ward on L2-normalised features (the
   default) or average linkage on cosine distance. By default each tree is cut by the stability cut
   (:mod:`pairtrace.tree_cut`: every branch at its own height); the number of clusters can instead be fixed, cut
   at a distance threshold, or chosen in ``2..max_clusters`` at the largest relative jump between merge heights
   (or by the Calinski–Harabasz index or the silhouette).
4. **Summaries.** For each pair cluster and behaviour cluster: size, mean within-cluster cosine, the prompts it
   is linked to (with M0 vs M1 responses), its top pairs with their sources and models, and its distinctive
   words (log-odds with an informative Dirichlet prior, chosen texts of the cluster vs all chosen texts).
5. **Views** (``also_response_tokens``). Steps 1–4 again with every response mean over its first N tokens, on the
   same prompts and the first view's columns (their datapoint vectors extracted anew), in ``views/first-N-tokens``.
   A response's head holds what it decides first (refuse or comply); its full mean, what it adds later.

Why profiles: a datapoint vector holds everything that differs between chosen and rejected (topic, length,
style), and most of that variance is unrelated to any behaviour. The profile projects each pair onto the
directions the behaviour vectors span, which removes that variance; on planted behaviours it separates the
contaminated pairs far better than clustering the raw vectors (measured in ``docs/discovery.md``). Its limit:
it can only separate what some behaviour vector points at, which is exactly what discovery asks.

Discovery never reads ground truth. An optional labels file (id, behaviour, contaminated) is used only after
clustering, to report purity and recall.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform

from pairtrace import __version__
from pairtrace.attribute import unit_rows
from pairtrace.errors import ConfigError, DataError
from pairtrace.labels import load_labels
from pairtrace.models import LoadedModel, ModelSpec, as_loaded_model
from pairtrace.pooling import ResponsePooling, mean_of_responses
from pairtrace.records import atomic_path, iter_jsonl, write_text_atomic
from pairtrace.tree_cut import compute_stability_cut

logger = logging.getLogger(__name__)

LINKAGES = ("ward", "average")
PAIR_FEATURES = ("profile", "vector")
AUTO_K = ("stability", "gap", "calinski_harabasz", "silhouette")
UNPLANTED = ("(none)", "clean", "none", "")
"""Behaviour labels that mean "no planted behaviour" (never scored for recall)."""
_REQUIRED_GENERATION_FIELDS = ("id", "prompt", "response")


@dataclass
class DiscoverConfig:
    """Settings of :func:`run_discover` (saved in ``summary.json``)."""

    linkage: str = field(default="ward", metadata={
        "help": "ward: Ward linkage on L2-normalised features; average: average linkage on cosine distance."})
    n_clusters: int | None = field(default=None, metadata={
        "help": "Clusters of pairs and of behaviour vectors; default: chosen automatically (auto_k)."})
    distance_threshold: float | None = field(default=None, metadata={
        "help": "Cut the dendrograms at this linkage height instead of a cluster count."})
    max_clusters: int = field(default=10, metadata={
        "help": "auto_k gap, calinski_harabasz, silhouette: the k in 2..max_clusters with the best score."})
    auto_k: str = field(default="stability", metadata={
        "help": "Automatic cut: stability (default: each branch of the tree cut at its own height, see "
                "pairtrace.tree_cut), gap (one cut at the largest jump between merge heights), calinski_harabasz "
                "or silhouette."})
    min_cluster_size: int | None = field(default=None, metadata={
        "help": "auto_k=stability: smallest cluster; default 1% of the items, at least 2 and at most 10."})
    top_k_per_prompt: int | None = field(default=None, metadata={
        "help": "Keep the union of each prompt's top-K pairs as columns; default: all pairs (see max_columns)."})
    max_columns: int = field(default=5000, metadata={
        "help": "With top_k_per_prompt unset and more pairs than this, K = max_columns // n_prompts is used."})
    cluster_pairs_on: str = field(default="profile", metadata={
        "help": "profile: each pair's cosines across behaviour vectors; vector: the datapoint vectors."})
    layer: int | None = field(default=None, metadata={
        "help": "Layer; default: the vector store's layer (the model's default layer if the store has several)."})
    also_response_tokens: list[int | None] = field(default_factory=list, metadata={
        "help": "Further views: discover again with every response mean over its first N tokens, once per N "
                "(null: every token), on the same prompts and the first view's columns; their datapoint vectors "
                "are extracted anew (views/<name>/vectors). Head pooling sees what a response decides at its "
                "start (refuse or comply), the full mean what it adds later (a sign-off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the silhouette subsample and the heatmap subsample."})
    heatmap_max_columns: int = field(default=400, metadata={
        "help": "Columns drawn in the heatmap (a stratified subsample, in dendrogram order, beyond this)."})
    n_top_prompts: int = field(default=5, metadata={"help": "Prompts listed per cluster."})
    n_top_pairs: int = field(default=10, metadata={"help": "Pairs listed per cluster."})
    n_words: int = field(default=12, metadata={"help": "Distinctive words listed per cluster."})
    batch_tokens: int | None = field(default=16384, metadata={
        "help": "Token budget per forward pass (teacher forcing); null: the device's default of datapoint extraction "
                "(2048 on CPU, 32768 on CUDA)."})
    max_length: int = field(default=2048, metadata={"help": "Maximum tokens per teacher-forced sequence."})

    def __post_init__(self) -> None:
        if self.linkage not in LINKAGES:
            raise ConfigError(f"DiscoverConfig field 'linkage': {self.linkage!r} is not one of {LINKAGES}")
        if self.cluster_pairs_on not in PAIR_FEATURES:
            raise ConfigError(
                f"DiscoverConfig field 'cluster_pairs_on': {self.cluster_pairs_on!r} is not one of {PAIR_FEATURES}")
        if self.auto_k not in AUTO_K:
            raise ConfigError(f"DiscoverConfig field 'auto_k': {self.auto_k!r} is not one of {AUTO_K}")
        if self.n_clusters is not None and self.distance_threshold is not None:
            raise ConfigError("DiscoverConfig: give n_clusters or distance_threshold, not both")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ConfigError(f"DiscoverConfig field 'n_clusters': must be at least 1, got {self.n_clusters}")
        self.also_response_tokens = list(self.also_response_tokens or [])
        for tokens in self.also_response_tokens:
            ResponsePooling(tokens)  # validates
        if len(set(self.also_response_tokens)) != len(self.also_response_tokens):
            raise ConfigError(f"DiscoverConfig field 'also_response_tokens': repeated values in "
                              f"{self.also_response_tokens}")
        if self.min_cluster_size is not None and self.min_cluster_size < 1:
            raise ConfigError(f"DiscoverConfig field 'min_cluster_size': must be at least 1, got "
                              f"{self.min_cluster_size}")
        if self.max_clusters < 2:
            raise ConfigError(f"DiscoverConfig field 'max_clusters': must be at least 2, got {self.max_clusters}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ConfigError(f"DiscoverConfig field 'batch_tokens': must be at least 1, got {self.batch_tokens}")
        if self.top_k_per_prompt is not None and self.top_k_per_prompt < 1:
            raise ConfigError(f"DiscoverConfig field 'top_k_per_prompt': must be at least 1, got "
                              f"{self.top_k_per_prompt}")


# ----------------------------------------------------------------------------------------------- generations


@dataclass
class PromptResponses:
    """The M0 and M1 responses to one prompt.

    Attributes:
        id: Prompt record id.
        prompt: The prompt text (one user turn).
        m0: M0's responses, in sample order.
        m1: M1's responses, in sample order.
        record: The prompt fields of the first generation record (``set``, ``condition``, ...).
    """

    id: str
    prompt: str
    m0: list[str]
    m1: list[str]
    record: dict[str, Any] = field(default_factory=dict)


def load_generation_records(path: str | Path) -> list[dict[str, Any]]:
    """Read generation records (JSONL) and check the fields discovery needs.

    Raises:
        DataError: A missing file, a line that is not a JSON object, or a missing/mistyped field (the message
            names the line and the field).
    """
    records = []
    for line_no, record in iter_jsonl(path):
        for name in _REQUIRED_GENERATION_FIELDS:
            if not isinstance(record.get(name), str):
                raise DataError(f"{path} line {line_no} (id {record.get('id')!r}): field '{name}' is missing "
                                "or not a string")
        records.append(record)
    return records


def _normalise(text: str) -> str:
    return " ".join(text.split())


def select_differing_prompts(m0_records: Sequence[dict[str, Any]],
                             m1_records: Sequence[dict[str, Any]]) -> tuple[list[PromptResponses], dict[str, int]]:
    """Prompts answered by both models whose M0 and M1 responses differ.

    Two prompts' response sets are compared after whitespace normalisation; a prompt where M1 said exactly what
    M0 said (as a set of texts) carries no behaviour difference and is dropped.

    Args:
        m0_records: M0 generation records.
        m1_records: M1 generation records.

    Returns:
        ``(kept prompts in M1 file order, counts)`` with counts ``n_prompts`` (answered by both), ``n_same``,
        ``n_only_m0``, ``n_only_m1``, ``n_kept``.
    """
    def group(records) -> dict[str, PromptResponses]:
        out: dict[str, PromptResponses] = {}
        for rec in records:
            fields = {k: v for k, v in rec.items() if k != "response"}
            item = out.setdefault(rec["id"], PromptResponses(rec["id"], rec["prompt"], [], [], fields))
            if item.prompt != rec["prompt"]:
                raise DataError(f"generation records for id {rec['id']!r} disagree on field 'prompt'")
            item.m1.append(rec["response"])  # collected here, assigned to m0 or m1 below
        return out

    m0, m1 = group(m0_records), group(m1_records)
    kept, same = [], 0
    for pid, item in m1.items():
        if pid not in m0:
            continue
        if m0[pid].prompt != item.prompt:
            raise DataError(f"M0 and M1 generation records for id {pid!r} have different 'prompt' fields")
        item.m0 = list(m0[pid].m1)
        if {_normalise(t) for t in item.m0} == {_normalise(t) for t in item.m1}:
            same += 1
            continue
        kept.append(item)
    both = sum(1 for pid in m1 if pid in m0)
    counts = {"n_prompts": both, "n_same": same, "n_only_m0": sum(1 for pid in m0 if pid not in m1),
              "n_only_m1": len(m1) - both, "n_kept": len(kept)}
    return kept, counts


def compute_prompt_behaviour_vectors(loaded, prompts: Sequence[PromptResponses], layer: int, *,
                                     batch_tokens: int | None = 16384, max_length: int = 2048,
                                     progress: bool = True, response_tokens: int | None = None,
                                     pooling: ResponsePooling | None = None) -> torch.Tensor:
    """One behaviour vector per prompt (Def. 3.1): mean M1-response activation − mean M0-response activation.

    Every response is teacher-forced through ``loaded`` (M0); identical (prompt, response) texts are run once
    and weighted by their count; a response with no tokens is left out of its side's mean (a side with no
    usable response gives a NaN vector, which :func:`run_discover` drops).

    Args:
        loaded: M0.
        prompts: Prompts with their M0 and M1 responses.
        layer: Layer k.
        batch_tokens: Token budget per forward pass (``None``: the device's default).
        max_length: Maximum tokens per sequence.
        progress: Show a progress bar.
        response_tokens: Average each response's first this many tokens only (``None``: all); the datapoint
            store's setting, so that both kinds of vector live in one space.
        pooling: The response pooling (instead of ``response_tokens``).

    Returns:
        ``[P, d]`` float32 behaviour vectors.
    """
    from pairtrace.activations import compute_response_means

    unique: dict[tuple[str, str], int] = {}
    for item in prompts:
        for text in (*item.m0, *item.m1):
            unique.setdefault((item.prompt, text), len(unique))
    keys = list(unique)
    means = compute_response_means(loaded, [k[0] for k in keys], [k[1] for k in keys], [layer],
                                   batch_tokens=batch_tokens, max_length=max_length, progress=progress,
                                   desc="behaviour responses",
                                   pooling=ResponsePooling.resolve(pooling, response_tokens))[:, 0]  # [u, d]
    out = torch.empty(len(prompts), means.shape[1], dtype=torch.float32)  # [P, d]
    for i, item in enumerate(prompts):
        # a response without tokens has no mean: it is left out, not allowed to poison the prompt
        m1 = mean_of_responses(means[[unique[(item.prompt, t)] for t in item.m1]])  # [d]
        m0 = mean_of_responses(means[[unique[(item.prompt, t)] for t in item.m0]])  # [d]
        out[i] = m1 - m0
    return out


# ------------------------------------------------------------------------------------------------ clustering


@dataclass
class Clustering:
    """One hierarchical clustering.

    Attributes:
        linkage: SciPy linkage matrix ``[n-1, 4]`` (``None`` for fewer than two items).
        labels: Cluster per item, ``1..n_clusters``.
        n_clusters: Number of clusters.
        criterion: ``"fixed"``, ``"distance_threshold"``, ``"stability"``, ``"gap"``, ``"calinski_harabasz"``,
            ``"silhouette"`` or ``"trivial"``.
        silhouette: Silhouette score of the chosen cut (``None`` for a single cluster), reported in every case.
        scores: Score of each candidate k (automatic choice only; for the stability cut, the chosen k's total
            stability).
    """

    linkage: np.ndarray | None
    labels: np.ndarray
    n_clusters: int
    criterion: str
    silhouette: float | None = None
    scores: dict[int, float] = field(default_factory=dict)


def _features(x: np.ndarray) -> np.ndarray:
    """L2-normalised rows; rows without a direction become zeros."""
    units, ok = unit_rows(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    units[~ok] = 0.0
    return units.numpy().astype(np.float64)


def _cosine_distance(units: np.ndarray) -> np.ndarray:
    dist = np.clip(1.0 - units @ units.T, 0.0, 2.0)  # [n, n]
    np.fill_diagonal(dist, 0.0)
    return dist


def cluster_features(x: np.ndarray, method: str = "ward", n_clusters: int | None = None,
                     distance_threshold: float | None = None, max_clusters: int = 10, seed: int = 0,
                     auto_k: str = "stability", silhouette_sample: int = 3000,
                     min_cluster_size: int | None = None) -> Clustering:
    """Hierarchical clustering of rows, with a fixed, thresholded or automatically chosen number of clusters.

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
        auto_k: ``stability``, ``gap``, ``calinski_harabasz`` or ``silhouette``.
        silhouette_sample: Largest number of items the silhouette score is computed on.
        min_cluster_size: Smallest cluster of the stability cut; default :func:`default_min_cluster_size`.

    Returns:
        The clustering (labels ``1..K`` in order of first appearance along the dendrogram's leaves).
    """
    from sklearn.metrics import calinski_harabasz_score

    n = len(x)
    if n < 2:
        return Clustering(None, np.ones(n, dtype=np.int64), min(n, 1), "trivial")
    units = _features(x)
    if method == "ward":
        z = linkage(units, method="ward", metric="euclidean")
        dist = None
    else:
        dist = _cosine_distance(units)
        z = linkage(squareform(dist, checks=False), method="average")
    scores: dict[int, float] = {}
    if n_clusters is not None:
        labels, criterion = fcluster(z, t=min(n_clusters, n), criterion="maxclust"), "fixed"
    elif distance_threshold is not None:
        labels, criterion = fcluster(z, t=distance_threshold, criterion="distance"), "distance_threshold"
    elif n < 3:
        labels, criterion = np.ones(n, dtype=np.int64), "trivial"
    elif auto_k == "stability":
        size = default_min_cluster_size(n) if min_cluster_size is None else min_cluster_size
        labels, total = compute_stability_cut(z, size)
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
    return Clustering(z, labels, k, criterion, sil, scores)


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


def compute_similarity(behaviour: torch.Tensor, datapoints: torch.Tensor) -> np.ndarray:
    """Cosine matrix ``[P, C]`` between behaviour vectors ``[P, d]`` and datapoint vectors ``[C, d]``."""
    b, _ = unit_rows(behaviour)
    x, _ = unit_rows(datapoints)
    return (torch.nan_to_num(b, nan=0.0) @ torch.nan_to_num(x, nan=0.0).T).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------- column selection


def select_columns(store, behaviour: torch.Tensor, layer: int, top_k: int | None, max_columns: int,
                   chunk_rows: int = 65536) -> tuple[np.ndarray, torch.Tensor, dict[str, Any]]:
    """Choose the datapoints that become columns, and read their vectors.

    Pairs with a zero or non-finite vector have no direction and are never columns. With ``top_k`` the columns
    are the union of each prompt's ``top_k`` most similar pairs; without it, every pair, unless the store holds
    more than ``max_columns`` pairs, in which case ``top_k = max_columns // P`` is used. The store is read twice
    (scores, then the selected rows), chunk by chunk, so memory stays flat in its size.

    Args:
        store: An open ``VectorStore``.
        behaviour: ``[P, d]`` behaviour vectors.
        layer: Stored layer to read.
        top_k: Pairs kept per prompt (``None``: see above).
        max_columns: Largest number of columns without an explicit ``top_k``.
        chunk_rows: Rows read at a time.

    Returns:
        ``(store rows [C] sorted, vectors [C, d], info)`` with info ``top_k_per_prompt``, ``n_no_direction``.
    """
    units, _ = unit_rows(behaviour)
    units = torch.nan_to_num(units, nan=0.0)  # [P, d]
    n_prompts = units.shape[0]
    info: dict[str, Any] = {"top_k_per_prompt": top_k}
    if top_k is None and store.n > max_columns:
        top_k = max(1, max_columns // max(n_prompts, 1))
        info["top_k_per_prompt"] = top_k
        logger.warning("%d pairs exceed max_columns=%d: keeping the union of each prompt's top-%d pairs",
                       store.n, max_columns, top_k)
    # running top-k per prompt: best_vals / best_rows [k, P]
    best_vals = torch.empty(0, n_prompts)
    best_rows = torch.empty(0, n_prompts, dtype=torch.long)
    valid_rows = []
    for start, chunk in store.iter_chunks(layer, rows=chunk_rows):
        x, ok = unit_rows(chunk)
        index = torch.arange(start, start + len(chunk))
        valid_rows.append(index[ok])
        if top_k is None:
            continue
        sims = torch.nan_to_num(x, nan=0.0) @ units.T  # [rows, P]
        sims[~ok] = -torch.inf
        vals = torch.cat([best_vals, sims])
        rows_all = torch.cat([best_rows, index[:, None].expand(-1, n_prompts)])
        k = min(top_k, len(vals))
        best_vals, pick = torch.topk(vals, k, dim=0)
        best_rows = torch.gather(rows_all, 0, pick)
    valid = torch.cat(valid_rows).numpy() if valid_rows else np.empty(0, dtype=np.int64)
    info["n_no_direction"] = store.n - len(valid)
    rows = valid if top_k is None else np.unique(best_rows[torch.isfinite(best_vals)].numpy())
    parts = []
    for start, chunk in store.iter_chunks(layer, rows=chunk_rows):
        local = rows[(rows >= start) & (rows < start + len(chunk))] - start
        if len(local):
            parts.append(chunk[torch.as_tensor(local)])
    width = store.hidden_size or behaviour.shape[1]
    vectors = torch.cat(parts) if parts else torch.empty(0, width)
    return rows.astype(np.int64), vectors.float(), info


# -------------------------------------------------------------------------------------------------- summaries


def compute_distinctive_words(cluster_texts: Sequence[str], all_texts: Sequence[str], n: int = 12,
                              prior: float = 10.0) -> list[dict[str, float]]:
    """Words over-used in a cluster's texts relative to the rest: log-odds with an informative Dirichlet prior.

    For word w with counts y_c (cluster), y_r (rest), totals n_c, n_r and prior a_w = prior · (share of w in all
    texts), δ = log((y_c+a)/(n_c+A−y_c−a)) − log((y_r+a)/(n_r+A−y_r−a)), z = δ / sqrt(1/(y_c+a) + 1/(y_r+a))
    (Monroe, Colaresi & Quinn 2008).

    Args:
        cluster_texts: The cluster's texts (they must be among ``all_texts``).
        all_texts: Every text (cluster + rest).
        n: Words returned.
        prior: Total prior mass A.

    Returns:
        ``[{"word", "z", "count"}]``, highest z first (only words with z > 0).
    """
    from sklearn.feature_extraction.text import CountVectorizer

    if not cluster_texts or not all_texts:
        return []
    vectorizer = CountVectorizer(lowercase=True, token_pattern=r"(?u)\b[^\W\d_][^\W\d_']+\b")
    try:
        counts_all = np.asarray(vectorizer.fit_transform(all_texts).sum(axis=0)).ravel().astype(float)  # [V]
    except ValueError:  # no word at all
        return []
    counts_c = np.asarray(vectorizer.transform(cluster_texts).sum(axis=0)).ravel().astype(float)
    counts_r = np.clip(counts_all - counts_c, 0.0, None)
    alpha = prior * counts_all / counts_all.sum()
    n_c, n_r = counts_c.sum(), counts_r.sum()
    delta = (np.log((counts_c + alpha) / (n_c + prior - counts_c - alpha))
             - np.log((counts_r + alpha) / (n_r + prior - counts_r - alpha)))
    z = delta / np.sqrt(1.0 / (counts_c + alpha) + 1.0 / (counts_r + alpha))
    words = vectorizer.get_feature_names_out()
    order = np.argsort(-z, kind="stable")
    return [{"word": str(words[i]), "z": round(float(z[i]), 3), "count": int(counts_c[i])}
            for i in order[:n] if z[i] > 0 and counts_c[i] > 0]


def _mean_pairwise_cosine(units: np.ndarray, rng: np.random.Generator, limit: int = 300) -> float | None:
    if len(units) < 2:
        return None
    if len(units) > limit:
        units = units[rng.choice(len(units), size=limit, replace=False)]
    sims = units @ units.T
    n = len(units)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def _truncate(text: str | None, limit: int = 300) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_user_text(prompt) -> str:
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else (prompt[-1].get("content", "") if prompt else "")


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
               "min_cluster_size": config.min_cluster_size}
    rows = cluster_features(behaviour.numpy(), **options)
    pair_features = sim.T if config.cluster_pairs_on == "profile" else datapoints.numpy()
    columns = cluster_features(pair_features, **options)
    blocks = np.zeros((rows.n_clusters, columns.n_clusters))
    for a in range(rows.n_clusters):
        for b in range(columns.n_clusters):
            blocks[a, b] = sim[np.ix_(rows.labels == a + 1, columns.labels == b + 1)].mean()
    return Discovery(list(prompts), list(pair_ids), sim, rows, columns, blocks, behaviour, datapoints)


def _pair_entry(pair, pid: str, score: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": pid, "score": round(float(score), 4)}
    if pair is not None:
        entry.update({"source": pair.source, "chosen_model": pair.chosen_model, "rejected_model": pair.rejected_model,
                      "prompt": _truncate(_last_user_text(pair.prompt), 200), "chosen": _truncate(pair.chosen),
                      "rejected": _truncate(pair.rejected)})
    return entry


def _prompt_entry(item: PromptResponses, score: float, cluster: int) -> dict[str, Any]:
    return {"id": item.id, "score": round(float(score), 4), "behaviour_cluster": cluster,
            "prompt": _truncate(item.prompt, 300), "m0_response": _truncate(item.m0[0] if item.m0 else None),
            "m1_response": _truncate(item.m1[0] if item.m1 else None), "n_m0": len(item.m0), "n_m1": len(item.m1)}


def summarise_clusters(discovery: Discovery, pairs_by_id: dict[str, Any], config: DiscoverConfig) -> dict[str, Any]:
    """Per-cluster summaries of pairs and behaviour vectors.

    Args:
        discovery: Output of :func:`discover_clusters`.
        pairs_by_id: ``Pair`` objects by id (texts, source, models); missing ids are listed without texts.
        config: Numbers of prompts, pairs and words per cluster.

    Returns:
        ``{"pair_clusters": [...], "behaviour_clusters": [...], "block_means": [[...]]}``.
    """
    rng = np.random.default_rng(config.seed)
    sim, rows, cols = discovery.similarity, discovery.rows, discovery.columns
    x_units = _features(discovery.datapoint_vectors.numpy())
    b_units = _features(discovery.behaviour_vectors.numpy())
    chosen_all = [getattr(pairs_by_id.get(pid), "chosen", "") or "" for pid in discovery.pair_ids]
    pair_clusters = []
    for c in range(1, cols.n_clusters + 1):
        members = np.flatnonzero(cols.labels == c)
        best_rows = int(np.argmax(discovery.block_means[:, c - 1])) + 1
        prompt_scores = sim[:, members].mean(axis=1)  # [P]
        top_prompts = np.argsort(-prompt_scores, kind="stable")[: config.n_top_prompts]
        pair_scores = sim[np.ix_(rows.labels == best_rows, members)].mean(axis=0)  # [m]
        top_members = members[np.argsort(-pair_scores, kind="stable")[: config.n_top_pairs]]
        member_pairs = [pairs_by_id.get(discovery.pair_ids[j]) for j in members]
        pair_clusters.append({
            "cluster": c,
            "size": len(members),
            "mean_within_similarity": _mean_pairwise_cosine(x_units[members], rng),
            "best_behaviour_cluster": best_rows,
            "link": round(float(discovery.block_means[best_rows - 1, c - 1]), 4),
            "mean_similarity_to_behaviours": [round(float(v), 4) for v in discovery.block_means[:, c - 1]],
            "top_prompts": [_prompt_entry(discovery.prompts[i], prompt_scores[i], int(rows.labels[i]))
                            for i in top_prompts],
            "top_pairs": [_pair_entry(pairs_by_id.get(discovery.pair_ids[j]), discovery.pair_ids[j],
                                      sim[rows.labels == best_rows, j].mean()) for j in top_members],
            "sources": _counts(p.source for p in member_pairs if p is not None),
            "chosen_models": _counts(p.chosen_model for p in member_pairs if p is not None),
            "rejected_models": _counts(p.rejected_model for p in member_pairs if p is not None),
            "distinctive_words": compute_distinctive_words([chosen_all[j] for j in members], chosen_all,
                                                           n=config.n_words),
        })
    behaviour_clusters = []
    for r in range(1, rows.n_clusters + 1):
        members = np.flatnonzero(rows.labels == r)
        best_cols = int(np.argmax(discovery.block_means[r - 1])) + 1
        pair_scores = sim[members].mean(axis=0)  # [C]
        top_pairs = np.argsort(-pair_scores, kind="stable")[: config.n_top_pairs]
        centroid = b_units[members].mean(0)
        closeness = b_units[members] @ centroid
        behaviour_clusters.append({
            "cluster": r,
            "size": len(members),
            "mean_within_similarity": _mean_pairwise_cosine(b_units[members], rng),
            "best_pair_cluster": best_cols,
            "prompts": [_prompt_entry(discovery.prompts[i], sim[i, cols.labels == best_cols].mean(), r)
                        for i in members[np.argsort(-closeness, kind="stable")][: config.n_top_prompts]],
            "top_pairs": [_pair_entry(pairs_by_id.get(discovery.pair_ids[j]), discovery.pair_ids[j],
                                      pair_scores[j]) for j in top_pairs],
            "distinctive_words": compute_distinctive_words([chosen_all[j] for j in top_pairs], chosen_all,
                                                           n=config.n_words),
        })
    return {"pair_clusters": pair_clusters, "behaviour_clusters": behaviour_clusters,
            "block_means": [[round(float(v), 4) for v in row] for row in discovery.block_means]}


def _counts(values, limit: int = 10) -> dict[str, int]:
    return dict(Counter("(missing)" if v is None else str(v) for v in values).most_common(limit))


# ------------------------------------------------------------------------------------------ labels (optional)


def evaluate_clusters(discovery: Discovery, labels: pd.DataFrame) -> dict[str, Any]:
    """Purity and recall of the pair clusters against ground-truth labels (reporting only).

    Args:
        discovery: The clustering.
        labels: Output of :func:`load_labels`.

    Returns:
        ``{"clusters": [{cluster, n_labelled, purity, dominant, contaminated_share}], "behaviours": [{behaviour,
        n_total, n_in_matrix, best_cluster, recall, precision}], "adjusted_rand_index"}``; the labels in
        :data:`UNPLANTED` (clean pairs) are not scored as behaviours.
    """
    from sklearn.metrics import adjusted_rand_score

    by_id = labels.set_index("id")
    ids = pd.Index(discovery.pair_ids)
    present = ids.isin(by_id.index)
    col_labels = discovery.columns.labels[present]
    behaviours = by_id.loc[ids[present], "behaviour"].to_numpy()
    contaminated = (by_id.loc[ids[present], "contaminated"].to_numpy()
                    if "contaminated" in by_id.columns else None)
    clusters = []
    for c in range(1, discovery.columns.n_clusters + 1):
        mask = col_labels == c
        counts = Counter(behaviours[mask].tolist())
        dominant, top = counts.most_common(1)[0] if counts else (None, 0)
        clusters.append({"cluster": c, "n_labelled": int(mask.sum()), "dominant": dominant,
                         "purity": top / int(mask.sum()) if mask.any() else None,
                         "behaviours": dict(counts),
                         "contaminated_share": float(contaminated[mask].mean()) if contaminated is not None
                         and mask.any() else None})
    per_behaviour = []
    totals = labels["behaviour"].value_counts()
    for name, total in totals.items():
        if str(name).lower() in UNPLANTED:
            continue
        mask = behaviours == name
        counts = Counter(col_labels[mask].tolist())
        best, hits = counts.most_common(1)[0] if counts else (None, 0)
        size = int((discovery.columns.labels == best).sum()) if best is not None else 0
        per_behaviour.append({"behaviour": name, "n_total": int(total), "n_in_matrix": int(mask.sum()),
                              "best_cluster": best, "recall": hits / int(total),
                              "precision": hits / size if size else None})
    ari = float(adjusted_rand_score(behaviours, col_labels)) if len(col_labels) > 1 else None
    return {"clusters": clusters, "behaviours": per_behaviour, "adjusted_rand_index": ari,
            "n_labelled_columns": int(present.sum())}


# ----------------------------------------------------------------------------------------------- artifacts


def _heatmap_columns(discovery: Discovery, limit: int, seed: int) -> np.ndarray | None:
    """Column indices drawn in the heatmap when subsampling (dendrogram order), or ``None`` for all columns."""
    n = len(discovery.pair_ids)
    if n <= limit:
        return None
    rng = np.random.default_rng(seed)
    labels = discovery.columns.labels
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, round(limit * len(members) / n))
        chosen.extend(rng.choice(members, size=min(take, len(members)), replace=False).tolist())
    order = leaves_list(discovery.columns.linkage) if discovery.columns.linkage is not None else np.arange(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return np.array(sorted(chosen, key=lambda j: position[j]), dtype=np.int64)


def plot_discovery(discovery: Discovery, limit: int = 400, seed: int = 0):
    """The clustered heatmap (seaborn ``clustermap``) of a discovery, columns subsampled beyond ``limit``."""
    from pairtrace.plots import plot_clustermap

    cols = _heatmap_columns(discovery, limit, seed)
    ids = [p.id for p in discovery.prompts]
    if cols is None:
        matrix = pd.DataFrame(discovery.similarity, index=ids, columns=discovery.pair_ids)
        col_linkage, col_labels = discovery.columns.linkage, discovery.columns.labels
        title = f"{len(ids)} behaviour vectors × {len(discovery.pair_ids)} pairs"
    else:
        matrix = pd.DataFrame(discovery.similarity[:, cols], index=ids,
                              columns=[discovery.pair_ids[j] for j in cols])
        col_linkage, col_labels = None, discovery.columns.labels[cols]
        title = (f"{len(ids)} behaviour vectors × {len(cols)} of {len(discovery.pair_ids)} pairs "
                 "(stratified sample, dendrogram order)")
    return plot_clustermap(matrix, discovery.rows.linkage, col_linkage, discovery.rows.labels, col_labels,
                           title=title)


def _clustering_info(c: Clustering) -> dict[str, Any]:
    return {"n_clusters": c.n_clusters, "criterion": c.criterion, "silhouette": c.silhouette,
            "score_by_k": {str(k): round(v, 4) for k, v in c.scores.items()},
            "sizes": [int((c.labels == i).sum()) for i in range(1, c.n_clusters + 1)]}


def save_discovery(discovery: Discovery, out_dir: str | Path, pairs_by_id: dict[str, Any], rows: np.ndarray,
                   config: DiscoverConfig) -> dict[str, str]:
    """Write the matrix, linkages, cluster assignments, vectors and heatmap; return the file names."""
    from safetensors.torch import save_file

    from pairtrace.plots import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [p.id for p in discovery.prompts]
    n_p, n_c = discovery.similarity.shape
    with atomic_path(out / "matrix.parquet") as tmp:
        pd.DataFrame({"prompt_id": np.repeat(np.asarray(ids, dtype=object), n_c),
                      "pair_id": np.tile(np.asarray(discovery.pair_ids, dtype=object), n_p),
                      "cosine": discovery.similarity.reshape(-1)}).to_parquet(tmp, index=False)
    for name, clustering in (("row", discovery.rows), ("col", discovery.columns)):
        z = clustering.linkage if clustering.linkage is not None else np.empty((0, 4))
        with atomic_path(out / f"{name}_linkage.npy") as tmp, tmp.open("wb") as fh:  # a handle: np.save adds .npy
            np.save(fh, np.asarray(z, dtype=np.float64), allow_pickle=False)
    row_order = np.argsort(leaves_list(discovery.rows.linkage)) if discovery.rows.linkage is not None else \
        np.arange(n_p)
    col_order = np.argsort(leaves_list(discovery.columns.linkage)) if discovery.columns.linkage is not None else \
        np.arange(n_c)
    with atomic_path(out / "behaviours.parquet") as tmp:
        pd.DataFrame({"prompt_id": ids, "cluster": discovery.rows.labels, "leaf_order": row_order,
                      "prompt": [p.prompt for p in discovery.prompts],
                      "n_m0": [len(p.m0) for p in discovery.prompts],
                      "n_m1": [len(p.m1) for p in discovery.prompts]}).to_parquet(tmp, index=False)
    meta = [pairs_by_id.get(pid) for pid in discovery.pair_ids]
    with atomic_path(out / "pairs.parquet") as tmp:
        pd.DataFrame({"pair_id": discovery.pair_ids, "row": rows, "cluster": discovery.columns.labels,
                      "leaf_order": col_order, "max_cosine": discovery.similarity.max(axis=0),
                      "source": [getattr(p, "source", None) for p in meta],
                      "chosen_model": [getattr(p, "chosen_model", None) for p in meta],
                      "rejected_model": [getattr(p, "rejected_model", None) for p in meta]}).to_parquet(
            tmp, index=False)
    with atomic_path(out / "prompt_vectors.safetensors") as tmp:
        save_file({"behaviour": discovery.behaviour_vectors.contiguous()}, str(tmp),
                  metadata={"prompt_ids": json.dumps(ids)})
    save_png(plot_discovery(discovery, config.heatmap_max_columns, config.seed), out / "heatmap.png")
    return {"matrix": "matrix.parquet", "row_linkage": "row_linkage.npy", "col_linkage": "col_linkage.npy",
            "behaviours": "behaviours.parquet", "pairs": "pairs.parquet",
            "prompt_vectors": "prompt_vectors.safetensors", "heatmap": "heatmap.png"}


def _choose_layer(store, loaded, layer: int | None) -> int:
    from pairtrace.models import default_layer

    layers = list(store.layers)
    if layer is not None:
        if layer not in layers:
            raise ConfigError(f"layer {layer} is not in the vector store (stored layers: {layers})")
        return layer
    preferred = default_layer(loaded.n_layers)
    return preferred if preferred in layers else layers[0]


def run_discover(model: LoadedModel | ModelSpec, vectors_dir: str | Path, generations_m0: str | Path,
                 generations_m1: str | Path, pairs_path: str | Path, out_dir: str | Path,
                 config: DiscoverConfig | None = None, *, labels_path: str | Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Discover behaviours and the pairs linked to them, without ground truth.

    Args:
        model: M0 (the model the datapoint vectors were extracted with): loaded, or a spec loaded here with
            :func:`pairtrace.models.load_model`.
        vectors_dir: Datapoint vector store.
        generations_m0: M0 generation records (JSONL) on a broad prompt set.
        generations_m1: M1 generation records on the same prompts.
        pairs_path: The preference pairs of the vector store (texts, sources, models).
        out_dir: Output directory.
        config: Settings.
        labels_path: Optional ground truth (id, behaviour, contaminated), read only for purity/recall.
        progress: Show progress bars.

    Returns:
        The content of ``summary.json``.

    Raises:
        ConfigError: ``model`` is neither a loaded model nor a model spec.
    """
    import time

    from pairtrace.data.pairs import load_pairs
    from pairtrace.store import VectorStore, check_compatible
    from pairtrace.vectors import build_expected, compute_datapoint_vectors

    config = config or DiscoverConfig()
    started = time.perf_counter()
    loaded = as_loaded_model(model, "run_discover")
    store = VectorStore.open(vectors_dir)
    layer = _choose_layer(store, loaded, config.layer)
    check_compatible(build_expected(loaded, store.layers), store.manifest, fields=("model", "template"),
                     where=f"vector store {vectors_dir}")
    pair_set = load_pairs(pairs_path)
    fingerprint = (store.manifest.dataset or {}).get("fingerprint")
    if fingerprint and pair_set.fingerprint and fingerprint != pair_set.fingerprint:
        from pairtrace.errors import ManifestMismatchError

        raise ManifestMismatchError(f"vector store {vectors_dir} was computed on dataset fingerprint {fingerprint}, "
                                    f"but {pairs_path} has fingerprint {pair_set.fingerprint}")
    pairs_by_id = {p.id: p for p in pair_set}
    missing = [pid for pid in store.ids if pid not in pairs_by_id]
    if missing:
        raise DataError(f"{len(missing)} vector ids are not in {pairs_path} (e.g. {missing[0]!r})")

    prompts, counts = select_differing_prompts(load_generation_records(generations_m0),
                                               load_generation_records(generations_m1))
    logger.info("%d of %d prompts answered differently by M0 and M1", counts["n_kept"], counts["n_prompts"])
    if not prompts:
        raise DataError("M0 and M1 answered every prompt identically: there is no behaviour difference to discover")
    labels = load_labels(labels_path) if labels_path is not None else None
    out = Path(out_dir)
    main_view, columns = discover_view(loaded, store, layer, prompts, counts, pairs_by_id, out, config, labels=labels,
                                       progress=progress)
    summary: dict[str, Any] = {
        "kind": "discover",
        "layer": layer,
        "model": dict(loaded.identity),
        "vectors": str(vectors_dir),
        "pairs": str(pairs_path),
        "generations": {"m0": str(generations_m0), "m1": str(generations_m1)},
        "config": asdict(config),
        **main_view,
        "pairtrace_version": __version__,
    }
    if labels_path is not None:
        summary["labels"] = {"path": str(labels_path), **summary["labels"]}
    views = []
    for tokens in config.also_response_tokens:
        pooling = ResponsePooling(tokens)
        if pooling == store.manifest.pooling:
            continue
        view_dir = out / "views" / pooling.name
        logger.info("view %s: datapoint vectors of the %d columns pooled over %s", pooling.name,
                    len(columns), pooling.describe())
        view_store = compute_datapoint_vectors(
            loaded, [pairs_by_id[pid] for pid in columns], view_dir / "vectors", layers=[layer],
            batch_tokens=config.batch_tokens, max_length=config.max_length, resume=False, progress=progress,
            pooling=pooling)
        view, _ = discover_view(loaded, view_store, layer, prompts, dict(counts), pairs_by_id, view_dir, config,
                                labels=labels, progress=progress)
        view = {"name": pooling.name, "response_tokens": pooling.response_tokens,
                "dir": str(view_dir.relative_to(out)), **view}
        views.append(_write_summary(view, view_dir))
    summary["views"] = views
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    return _write_summary(summary, out)


def _write_summary(summary: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``summary.json`` (JSON-safe) into ``out_dir`` and return what was written."""
    summary = _json_safe(summary)
    write_text_atomic(json.dumps(summary, indent=2, ensure_ascii=False), out_dir / "summary.json")
    return summary


def view_name(response_tokens: int | None) -> str:
    """Directory name of a discovery view: ``all-tokens`` or ``first-N-tokens``."""
    return ResponsePooling(response_tokens).name


def discover_view(loaded, store, layer: int, prompts: Sequence[PromptResponses], counts: dict[str, int],
                  pairs_by_id: dict[str, Any], out_dir: Path, config: DiscoverConfig, *,
                  labels: pd.DataFrame | None = None, progress: bool = True) -> tuple[dict[str, Any], list[str]]:
    """One discovery on one vector store: behaviour vectors pooled like the store, columns, clusters, files.

    Args:
        loaded: M0.
        store: Datapoint vector store (its manifest's response pooling is used for the behaviour vectors too).
        layer: Layer of the store to use.
        prompts: Prompts answered differently by M0 and M1.
        counts: Prompt counts (updated with ``n_zero_behaviour`` when vectors are dropped).
        pairs_by_id: Pairs by id (texts, sources, models).
        out_dir: Where the matrix, linkages, parquet files and heatmap go.
        config: Settings.
        labels: Optional ground truth, read only for purity and recall.
        progress: Show progress bars.

    Returns:
        The view's part of ``summary.json`` (pooling, prompt counts, columns, clusterings, cluster summaries,
        files, and ``labels`` when given), and the ids of its column pairs.
    """
    pooling = store.manifest.pooling
    behaviour = compute_prompt_behaviour_vectors(  # pooled like the store's datapoint vectors
        loaded, prompts, layer, batch_tokens=config.batch_tokens, max_length=config.max_length, progress=progress,
        pooling=pooling)
    _, ok = unit_rows(behaviour)
    if not bool(ok.all()):
        keep = ok.numpy()
        logger.warning("%d behaviour vectors are zero or non-finite and were dropped", int((~keep).sum()))
        prompts = [p for p, k in zip(prompts, keep, strict=True) if k]
        behaviour = behaviour[ok]
        counts["n_zero_behaviour"] = int((~keep).sum())
    rows, datapoints, column_info = select_columns(store, behaviour, layer, config.top_k_per_prompt,
                                                   config.max_columns)
    pair_ids = [store.ids[r] for r in rows]
    discovery = discover_clusters(prompts, behaviour, pair_ids, datapoints, config)
    files = save_discovery(discovery, out_dir, pairs_by_id, rows, config)
    view: dict[str, Any] = {
        "response_tokens": pooling.response_tokens,
        "prompts": counts,
        "n_pairs_total": store.n,
        "n_columns": len(pair_ids),
        **column_info,
        "behaviour_clustering": _clustering_info(discovery.rows),
        "pair_clustering": {**_clustering_info(discovery.columns), "features": config.cluster_pairs_on},
        **summarise_clusters(discovery, pairs_by_id, config),
        "files": files,
    }
    if labels is not None:
        view["labels"] = evaluate_clusters(discovery, labels)
    return view, pair_ids


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
