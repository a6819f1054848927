"""Discovery: find behaviours nobody was looking for, and the preference pairs that taught them.

1. **Behaviours.** From M0 and M1 generations on a broad prompt set, keep the prompts whose M0 and M1 responses
   differ (as sets of whitespace-normalised texts) and build one behaviour vector per prompt (paper Def. 3.1):
   v_p = mean ā(p, r; M0, k) over M1's responses − mean ā(p, r; M0, k) over M0's responses (both teacher-forced
   through M0, like the datapoint vectors).
2. **Similarity.** S[p, d] = cos(v_p, v_d) for every pair d, or for the union of each prompt's top-K pairs.
3. **Co-clustering.** Rows (behaviour vectors) are clustered on the vectors themselves; columns (pairs) on their
   *similarity profiles* S[:, d] across behaviour vectors (the default; ``cluster_pairs_on="vector"`` clusters
   the datapoint vectors instead). By default the clusters are the dense groups scikit-learn's HDBSCAN finds in the
   L2-normalised features, its noise cut into clusters of its own (:func:`pairtrace.clustering.cluster_noise`).
   Both also get a SciPy tree (Ward on L2-normalised features, the default, or average linkage on cosine
   distance), which orders the labels and can be cut instead: by the stability cut (:mod:`pairtrace.tree_cut`:
   every branch at its own height), at a fixed number of clusters, at a distance threshold, or at a k in
   ``2..max_clusters`` chosen by the largest relative jump between merge heights (or by the Calinski–Harabasz
   index or the silhouette).
4. **Summaries.** For each pair cluster and behaviour cluster: size, mean within-cluster cosine, the prompts it
   is linked to (with M0 vs M1 responses), its top pairs with their sources and models, and its distinctive
   words (log-odds with an informative Dirichlet prior, chosen texts of the cluster vs all chosen texts).
5. **Views** (``also_response_tokens``). Steps 1–4 again with every response mean over its first N tokens (or every
   token), on the same prompts, in ``views/<name>``. Its candidate columns are the first view's columns plus the
   pairs that had no direction there (chosen and rejected identical over the first view's tokens), their datapoint
   vectors extracted anew. A response's head holds what it decides first (refuse or comply); its full mean, what
   it adds later (a sign-off, which only a view over every token can see).

Why profiles: a datapoint vector holds everything that differs between chosen and rejected (topic, length,
style), and most of that variance is unrelated to any behaviour. The profile projects each pair onto the
directions the behaviour vectors span, which removes that variance; on planted behaviours it separates the
contaminated pairs far better than clustering the raw vectors (measured in ``docs/discovery.md``). Its limit:
it can only separate what some behaviour vector points at, which is exactly what discovery asks.

Discovery never reads ground truth. An optional labels file (id, behaviour, contaminated) is used only after
clustering, to report purity and recall.

Modules: :mod:`pairtrace.discover_matrix` (steps 1–2: rows, columns, cosines), :mod:`pairtrace.clustering` (step
3), :mod:`pairtrace.discover_summaries` (step 4, labels, heatmap, artifacts); this one holds the settings and the
runner (:func:`run_discover`, with step 5).
"""


from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pairtrace import __version__
from pairtrace.attribute import unit_rows
from pairtrace.clustering import AUTO_K, DEFAULT_MAX_CLUSTER_FRACTION, LINKAGES, clustering_info, discover_clusters
from pairtrace.discover_matrix import (
    PromptResponses,
    compute_prompt_behaviour_vectors,
    load_generation_records,
    select_columns,
    select_differing_prompts,
)
from pairtrace.discover_summaries import evaluate_clusters, save_discovery, summarise_clusters
from pairtrace.errors import ConfigError, DataError
from pairtrace.labels import load_labels
from pairtrace.models import LoadedModel, ModelSpec, as_loaded_model
from pairtrace.pooling import ResponsePooling
from pairtrace.records import write_text_atomic

logger = logging.getLogger(__name__)


PAIR_FEATURES = ("profile", "vector")


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
    auto_k: str = field(default="hdbscan", metadata={
        "help": "Automatic clustering: hdbscan (default: the dense groups, scikit-learn's HDBSCAN; the items it calls "
                "noise are cut into clusters of their own by the stability cut), stability (each branch of the tree "
                "cut at its own height, see pairtrace.tree_cut), gap (one cut at the largest jump between merge "
                "heights), calinski_harabasz or silhouette. See docs/discovery.md for when each wins."})
    min_cluster_size: int | None = field(default=None, metadata={
        "help": "auto_k=hdbscan: smallest cluster, default 4% of the items and at least 5; auto_k=stability: "
                "default 1% of the items, at least 2 and at most 10."})
    max_cluster_fraction: float | None = field(default=DEFAULT_MAX_CLUSTER_FRACTION, metadata={
        "help": "auto_k=hdbscan or stability: largest cluster, as a share of the items (null: no limit); keeps the "
                "clustering from stopping at two halves of the items."})
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
                "(null: every token), on the same prompts; its candidate columns are the first view's columns and "
                "the pairs with no direction there, their datapoint vectors extracted anew (views/<name>/vectors). "
                "Head pooling sees what a response decides at its start (refuse or comply), the full mean what it "
                "adds later (a sign-off)."})
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
        if self.max_cluster_fraction is not None and not 0 < self.max_cluster_fraction <= 1:
            raise ConfigError(f"DiscoverConfig field 'max_cluster_fraction': must be in (0, 1] or null, got "
                              f"{self.max_cluster_fraction}")
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
    from pairtrace.store import VectorStore, build_expected, check_compatible
    from pairtrace.vectors import compute_datapoint_vectors

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
    main_view, columns, no_direction = discover_view(loaded, store, layer, prompts, counts, pairs_by_id, out, config,
                                                     labels=labels, progress=progress)
    # a view may give a direction to the pairs the first one could not see: they are its candidates too
    candidate_ids = set(columns) | set(no_direction)
    view_candidates = [pid for pid in store.ids if pid in candidate_ids]  # store order
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
        logger.info("view %s: datapoint vectors of %d candidate pairs (%d columns of the first view, %d with no "
                    "direction there) pooled over %s", pooling.name, len(view_candidates), len(columns),
                    len(no_direction), pooling.describe())
        view_store = compute_datapoint_vectors(
            loaded, [pairs_by_id[pid] for pid in view_candidates], view_dir / "vectors", layers=[layer],
            batch_tokens=config.batch_tokens, max_length=config.max_length, resume=False, progress=progress,
            pooling=pooling)
        view, _, _ = discover_view(loaded, view_store, layer, prompts, dict(counts), pairs_by_id, view_dir, config,
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
                  labels: pd.DataFrame | None = None,
                  progress: bool = True) -> tuple[dict[str, Any], list[str], list[str]]:
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
        files, and ``labels`` when given), the ids of its column pairs, and the ids of the pairs with no
        direction in ``store``.
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
    rows, datapoints, column_info, no_direction = select_columns(store, behaviour, layer, config.top_k_per_prompt,
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
        "behaviour_clustering": clustering_info(discovery.rows),
        "pair_clustering": {**clustering_info(discovery.columns), "features": config.cluster_pairs_on},
        **summarise_clusters(discovery, pairs_by_id, config),
        "files": files,
    }
    if labels is not None:
        view["labels"] = evaluate_clusters(discovery, labels)
    return view, pair_ids, [store.ids[r] for r in no_direction]


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
