"""Screen a preference dataset before training: score every pair against a library of behaviours through M0.

For each behaviour: a ranking (cosine of each datapoint vector with the behaviour vector, the probe score of
:mod:`pairtrace.attribute`), the pairs that pass the threshold calibrated on its examples, the top pairs with their
text, and enrichment by source and chosen model among the passing pairs. Behaviours that share a vector store
(same pooling and layer) are scored in one pass over it (:func:`score_behaviours`); the store is computed once per
pooling the library needs.

    result = compute_screen({pooling.name: store}, behaviours, pairs=pair_set)
    run_screen("mix.jsonl", ModelSpec("m0/"), "library/", "screen/")   # on paths, with the HTML page
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pairtrace.attribute import (
    AttributionConfig,
    Ranking,
    behaviour_matrix,
    build_ranking,
    pair_metadata_frame,
    ranking_metadata,
    save_ranking,
    unit_rows,
)
from pairtrace.behaviour_library import LibraryBehaviour, check_entry_matches_store, load_library
from pairtrace.errors import ManifestMismatchError
from pairtrace.records import write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)

ENRICHMENT_COLUMNS = ("source", "chosen_model")
FALLBACK_SHARE = 0.01
"""Share of the pairs used for enrichment when no pair passes a behaviour's threshold."""


def score_behaviours(store: Any, behaviours: Sequence[LibraryBehaviour], *, chunk_rows: int = 65536) -> np.ndarray:
    """Cosine of every datapoint vector with several behaviour vectors, in one pass over the store.

    Args:
        store: An open vector store.
        behaviours: Behaviours built with the store's model, template, pooling, and at one of its layers (all at
            the same layer).
        chunk_rows: Datapoint vectors read per chunk.

    Returns:
        ``[n_pairs, n_behaviours]`` float64 cosines in store order; NaN for a datapoint vector without direction.

    Raises:
        ManifestMismatchError: A behaviour from another model, template, pooling or layer, or behaviours at
            different layers.
    """
    if not behaviours:
        return np.zeros((store.n, 0))
    for b in behaviours:
        check_entry_matches_store(store, b)
    layers = {b.layer for b in behaviours}
    if len(layers) > 1:
        raise ManifestMismatchError(f"behaviours scored in one pass must share a layer, got layers {sorted(layers)}")
    layer = layers.pop()
    units = torch.cat([behaviour_matrix(b.vectors, layer, "probe") for b in behaviours])  # [B, d]
    scores = np.full((store.n, len(behaviours)), np.nan)
    for start, chunk in store.iter_chunks(layer, rows=chunk_rows):
        rows, ok = unit_rows(chunk, inplace=True)
        sims = torch.nan_to_num(rows, nan=0.0) @ units.T  # [rows, B]
        sims[~ok] = float("nan")
        scores[start:start + len(chunk)] = sims.double().numpy()
    return scores


@dataclass
class BehaviourScreen:
    """The screen of one behaviour.

    Attributes:
        behaviour: The library behaviour.
        ranking: Every pair, best first (``score`` = cosine with the behaviour vector).
        n_pass: Pairs whose score reaches the calibrated threshold.
        enrichment: Source and chosen-model enrichment among the passing pairs (``k`` in ``attrs``).
        top: The best pairs with their text (``rank``, ``id``, ``score``, ``prompt``, ``chosen``, ``rejected``,
            ``source``, ``chosen_model``).
    """

    behaviour: LibraryBehaviour
    ranking: Ranking
    n_pass: int
    enrichment: pd.DataFrame | None
    top: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Plain-data summary (``screen.json``)."""
        b = self.behaviour
        enrichment = None
        if self.enrichment is not None:
            enrichment = {"k": int(self.enrichment.attrs.get("k", 0)),
                          "rows": json.loads(self.enrichment.head(12).to_json(orient="records"))}
        return {
            "name": b.name,
            "description": b.description,
            "n_examples": b.n_examples,
            "layer": b.layer,
            "pooling": b.pooling.name,
            "threshold": b.calibration.threshold,
            "quantile": b.calibration.quantile,
            "loo_scores": b.calibration.loo_scores,
            "n_pairs": len(self.ranking),
            "n_pass": self.n_pass,
            "share_pass": self.n_pass / max(1, len(self.ranking)),
            "n_nan": int(self.ranking.metadata.get("n_nan", 0)),
            "enrichment": enrichment,
            "top": self.top,
        }


@dataclass
class ScreenResult:
    """The screen of every behaviour of a library over one dataset."""

    behaviours: dict[str, BehaviourScreen]
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Plain-data summary (``screen.json``)."""
        return {**self.metadata, "behaviours": {n: s.summary() for n, s in self.behaviours.items()}}


def _store_for(stores: Mapping[str, Any], behaviour: LibraryBehaviour) -> Any:
    store = stores.get(behaviour.pooling.name)
    if store is None:
        raise ManifestMismatchError(
            f"behaviour {behaviour.name!r} pools {behaviour.pooling.describe()} of each response, but no vector "
            f"store was pooled that way (stores: {', '.join(stores) or 'none'})"
        )
    return store


def _top_pairs(ranking: Ranking, texts: Mapping[str, Any] | None, n: int) -> list[dict[str, Any]]:
    rows = []
    for rec in ranking.table.head(n).to_dict(orient="records"):
        score = rec["score"]
        row = {"rank": int(rec["rank"]), "id": rec["id"], "score": None if pd.isna(score) else float(score),
               "source": rec["source"], "chosen_model": rec["chosen_model"]}
        pair = (texts or {}).get(rec["id"])
        if pair is not None:
            prompt = pair.prompt
            row["prompt"] = prompt[-1]["content"] if prompt else ""
            row["chosen"], row["rejected"] = pair.chosen, pair.rejected
        rows.append(row)
    return rows


def _enrichment(ranking: Ranking, n_pass: int) -> pd.DataFrame | None:
    from pairtrace.sources import compute_source_enrichment

    scored = int(ranking.table["score"].notna().sum())
    if scored == 0:
        return None
    columns = [c for c in ENRICHMENT_COLUMNS if ranking.table[c].notna().any()]
    if not columns:
        return None
    k = n_pass if n_pass > 0 else max(1, round(FALLBACK_SHARE * scored))
    return compute_source_enrichment(ranking, min(k, scored), columns=columns)


def compute_screen(stores: Mapping[str, Any], behaviours: Sequence[LibraryBehaviour], *,
                   pairs: Sequence[Any] | None = None, top_n: int = 20, chunk_rows: int = 65536) -> ScreenResult:
    """Screen the pairs of one dataset against several behaviours.

    Args:
        stores: Vector stores of the dataset's datapoint vectors, keyed by pooling name
            (:attr:`pairtrace.pooling.ResponsePooling.name`); each behaviour is scored on the store of its pooling.
        behaviours: The library behaviours.
        pairs: The pairs (a ``PairSet`` or list), for the top pairs' text and the metadata columns (default: the
            stores' own ``pairs.parquet``, without text).
        top_n: Pairs listed with their text per behaviour.
        chunk_rows: Datapoint vectors per chunk.

    Returns:
        One :class:`BehaviourScreen` per behaviour, in the given order.

    Raises:
        ManifestMismatchError: A behaviour without a matching store (model, template, pooling, layer).
    """
    groups: dict[tuple[int, int], list[LibraryBehaviour]] = {}
    store_of: dict[int, Any] = {}
    for b in behaviours:
        store = _store_for(stores, b)
        store_of[id(store)] = store
        groups.setdefault((id(store), b.layer), []).append(b)
    texts = {p.id: p for p in pairs} if pairs is not None else None
    meta_frame = pair_metadata_frame(pairs) if pairs is not None else None
    screens: dict[str, BehaviourScreen] = {}
    for (store_id, layer), group in groups.items():
        store = store_of[store_id]
        frame = meta_frame if meta_frame is not None else store.pair_metadata()
        scores = score_behaviours(store, group, chunk_rows=chunk_rows)
        config = AttributionConfig(method="probe", layer=layer, chunk_rows=chunk_rows)
        for j, b in enumerate(group):
            units = behaviour_matrix(b.vectors, layer, "probe")
            meta = ranking_metadata(store, b.vectors, config, layer, units,
                                    extra={"screen": {"behaviour": b.name, "threshold": b.calibration.threshold,
                                                      "examples_sha256": b.examples_sha256}})
            ranking = build_ranking(list(store.ids), scores[:, j], meta, pair_metadata=frame)
            column = scores[:, j]
            n_pass = int(np.sum(np.nan_to_num(column, nan=-np.inf) >= b.calibration.threshold))
            screens[b.name] = BehaviourScreen(behaviour=b, ranking=ranking, n_pass=n_pass,
                                              enrichment=_enrichment(ranking, n_pass),
                                              top=_top_pairs(ranking, texts, top_n))
    ordered = {b.name: screens[b.name] for b in behaviours}
    first = next(iter(stores.values()), None)
    metadata = {"kind": "screen", "n_pairs": first.n if first is not None else 0,
                "model": dict(first.manifest.model or {}) if first is not None else {},
                "dataset": dict(first.manifest.dataset or {}) if first is not None else {}}
    return ScreenResult(behaviours=ordered, metadata=metadata)


def save_screen(result: ScreenResult, out_dir: str | Path, *, html: bool = True) -> Path:
    """Write a screen: ``rankings/<behaviour>/ranking.*``, ``top/<behaviour>.jsonl``,
    ``enrichment/<behaviour>.csv``, ``screen.json`` and (``html``) ``screen.html``.

    Returns:
        The path of ``screen.json``.
    """
    out = Path(out_dir)
    for name, screen in result.behaviours.items():
        save_ranking(screen.ranking, out / "rankings" / name)
        write_jsonl_atomic(screen.top, out / "top" / f"{name}.jsonl")
        if screen.enrichment is not None:
            write_text_atomic(screen.enrichment.to_csv(index=False), out / "enrichment" / f"{name}.csv")
    path = write_text_atomic(json.dumps(result.summary(), indent=1, ensure_ascii=False, default=str),
                             out / "screen.json")
    if html:
        from pairtrace.screen_report import write_screen_html

        write_screen_html(result, out / "screen.html")
    return path


def compute_screen_stores(loaded: Any, pairs: Any, behaviours: Sequence[LibraryBehaviour], out_dir: str | Path, *,
                          batch_tokens: int | None = None, max_length: int = 2048, shard_size: int = 1024,
                          progress: bool = True) -> dict[str, Any]:
    """The datapoint vectors a library needs: one store per pooling, at the behaviours' layers
    (``out_dir/<pooling name>/``, resumed when already there)."""
    from pairtrace.vectors import compute_datapoint_vectors

    needed: dict[str, tuple[Any, set[int]]] = {}
    for b in behaviours:
        pooling, layers = needed.setdefault(b.pooling.name, (b.pooling, set()))
        layers.add(b.layer)
    stores = {}
    for name, (pooling, layers) in needed.items():
        stores[name] = compute_datapoint_vectors(loaded, pairs, Path(out_dir) / name, layers=sorted(layers),
                                                 shard_size=shard_size, batch_tokens=batch_tokens,
                                                 max_length=max_length, progress=progress, pooling=pooling)
    return stores


def run_screen(pairs: str | Path, model: Any, library: str | Path, out_dir: str | Path, *,
               names: list[str] | None = None, split: str | None = None, revision: str | None = None,
               limit: int | None = None, strict: bool = False, batch_tokens: int | None = None,
               max_length: int = 2048, top_n: int = 20, progress: bool = True) -> ScreenResult:
    """Screen a dataset on paths: load the pairs, M0 and the library, compute the datapoint vectors each pooling
    needs (``out_dir/vectors/``), score, and save (:func:`save_screen`).

    Args:
        pairs: The pairs (any input :func:`pairtrace.data.pairs.load_pairs` reads).
        model: M0: a :class:`~pairtrace.model_spec.ModelSpec` or a loaded model.
        library: The behaviour library directory.
        out_dir: Output directory.
        names: Behaviours to screen for (default: all of the library).
        split: Split of a dataset.
        revision: Revision of a hub dataset.
        limit: Only the first N records.
        strict: Stop at the first bad record.
        batch_tokens: Token budget per forward pass.
        max_length: Longest sequence in tokens.
        top_n: Pairs listed with their text per behaviour.
        progress: Show progress bars.

    Returns:
        The screen.
    """
    from pairtrace.data.pairs import load_pairs
    from pairtrace.models import LoadedModel, load_model

    started = time.perf_counter()
    behaviours = load_library(library, names)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    pair_set = load_pairs(pairs, split=split, revision=revision, strict=strict, limit=limit)
    stores = compute_screen_stores(loaded, pair_set, behaviours, Path(out_dir) / "vectors",
                                   batch_tokens=batch_tokens, max_length=max_length, progress=progress)
    result = compute_screen(stores, behaviours, pairs=pair_set, top_n=top_n)
    result.metadata.update({"pairs": str(pairs), "library": str(library), "n_skipped": len(pair_set.skipped),
                            "seconds": round(time.perf_counter() - started, 1)})
    save_screen(result, out_dir)
    return result


__all__ = [
    "BehaviourScreen",
    "ScreenResult",
    "compute_screen",
    "compute_screen_stores",
    "run_screen",
    "save_screen",
    "score_behaviours",
]
