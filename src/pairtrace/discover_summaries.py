"""What discovery reports about its clusters: summaries (prompts, pairs, distinctive words), purity and recall
against optional labels, the clustered heatmap, and the saved artifacts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import leaves_list

from pairtrace.clustering import Discovery, unit_features
from pairtrace.discover_matrix import PromptResponses
from pairtrace.records import atomic_path

if TYPE_CHECKING:
    from pairtrace.discover import DiscoverConfig

UNPLANTED = ("(none)", "clean", "none", "")
"""Behaviour labels that mean \"no planted behaviour\" (never scored for recall)."""

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
    x_units = unit_features(discovery.datapoint_vectors.numpy())
    b_units = unit_features(discovery.behaviour_vectors.numpy())
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
