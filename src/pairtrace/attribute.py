"""Cosine attribution: score every datapoint vector against behaviour vectors and rank pairs best-first.

Scores are computed in chunks of datapoint vectors, so memory stays flat in the number of pairs:

    X   [rows, d]   one chunk of datapoint vectors (float32)
    B   [m, d]      behaviour vectors (m = 1 for the probe, m = bank size for the bank)
    S   [rows, m]   cosines;  probe score = S[:, 0],  bank score = max over m (the true max, never floored)

A datapoint vector with zero norm (identical chosen and rejected) or non-finite entries has no direction: its
score is NaN, it is counted in the ranking's metadata, and it sorts last.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pairtrace import __version__
from pairtrace.errors import ManifestMismatchError, PairtraceError
from pairtrace.pooling import ResponsePooling
from pairtrace.records import atomic_path, write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)

METHODS = ("probe", "bank", "mean")
RANKING_COLUMNS = ("id", "row", "score", "rank", "source", "chosen_model", "rejected_model")
_ZERO_NORM = 1e-12


@dataclass
class AttributionConfig:
    """Arguments of :func:`compute_attribution` (saved as JSON beside the ranking)."""

    method: str = field(
        default="probe",
        metadata={"help": "probe: cosine with the pooled probe; bank: max cosine over per-prompt vectors; "
                  "mean: mean cosine over per-triple vectors."},
    )
    layer: int | None = field(
        default=None, metadata={"help": "Layer to score at; default: the only / first layer stored."}
    )
    chunk_rows: int = field(default=65536, metadata={"help": "Datapoint vectors scored per chunk."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PairtraceError(f"unknown attribution method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.chunk_rows < 1:
            raise PairtraceError(f"chunk_rows must be positive, got {self.chunk_rows}")


def unit_rows(x: torch.Tensor, *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise rows; rows with zero norm or non-finite entries become NaN.

    Args:
        x: [n, d] vectors.
        inplace: Normalise ``x`` itself (float32 input only) instead of a copy: the scale scorer's chunks are its
            own, and a [n, d] copy per chunk is most of its time and memory.

    Returns:
        ``(unit [n, d] float32, ok [n] bool)`` where ``ok`` marks rows that have a direction.
    """
    x = x.to(torch.float32)
    finite = torch.isfinite(x).all(dim=1)  # [n]
    plain = bool(finite.all()) and x.is_contiguous()  # then the norms need no zero-filled copy
    norms = torch.linalg.vector_norm(x if plain else torch.where(finite[:, None], x, torch.zeros_like(x)), dim=1)
    ok = finite & (norms > _ZERO_NORM)
    divisor = norms.clamp_min(_ZERO_NORM)[:, None]  # [n, 1]
    unit = x.div_(divisor) if inplace else x / divisor
    if not bool(ok.all()):
        unit[~ok] = float("nan")
    return unit, ok


def score_chunk(chunk: torch.Tensor, behaviour_units: torch.Tensor, method: str, *,
                inplace: bool = False) -> torch.Tensor:
    """Score one chunk of datapoint vectors.

    Args:
        chunk: [rows, d] datapoint vectors.
        behaviour_units: [m, d] unit behaviour vectors.
        method: ``probe`` (m must be 1), ``bank`` (max over m) or ``mean`` (mean over m).
        inplace: The chunk may be overwritten (see :func:`unit_rows`).

    Returns:
        [rows] float32 scores, NaN where the datapoint vector has no direction.
    """
    units, ok = unit_rows(chunk, inplace=inplace)
    all_ok = bool(ok.all())
    sims = (units if all_ok else torch.nan_to_num(units, nan=0.0)) @ behaviour_units.T  # [rows, m]
    scores = reduce_similarities(sims, method)  # [rows]
    if not all_ok:
        scores[~ok] = float("nan")
    return scores


def resolve_scoring(store: Any, behaviour: Any,
                    config: AttributionConfig | None) -> tuple[AttributionConfig, int, torch.Tensor]:
    """The config (default if ``None``), the layer to score and the unit behaviour rows ``[m, d]`` at it.

    Raises:
        ManifestMismatchError: Behaviour vectors from another model or template, or a layer the store lacks.
    """
    config = config or AttributionConfig()
    check_behaviour_matches_store(store, behaviour)
    layer = config.layer if config.layer is not None else next(iter(store.layers))
    if layer not in list(store.layers):
        raise ManifestMismatchError(
            f"datapoint vectors were stored at layers {list(store.layers)}, not at layer {layer}"
        )
    return config, layer, behaviour_matrix(behaviour, layer, config.method)


def reduce_similarities(sims: torch.Tensor, method: str) -> torch.Tensor:
    """[rows, m] similarities to the behaviour vectors -> [rows]: bank = max, mean = mean, probe = the only column."""
    if method == "bank":
        return sims.max(dim=1).values
    if method == "mean":
        return sims.mean(dim=1)
    return sims[:, 0]


def behaviour_matrix(behaviour, layer: int, method: str) -> torch.Tensor:
    """The [m, d] unit behaviour vectors a method scores against at ``layer``.

    Args:
        behaviour: A ``BehaviourVectors`` (probe [L, d], bank [b, L, d], per_triple [t, L, d], layers).
        layer: Layer index (must be one of ``behaviour.layers``).
        method: One of :data:`METHODS`.
    """
    layers = list(behaviour.layers)
    if layer not in layers:
        raise ManifestMismatchError(
            f"behaviour vectors were computed at layers {layers}, not at layer {layer}; recompute them at "
            f"layer {layer} or score at one of {layers}"
        )
    j = layers.index(layer)
    if method == "probe":
        mat = behaviour.probe[j][None, :]
    elif method == "bank":
        mat = behaviour.bank[:, j, :]
    else:
        mat = behaviour.per_triple[:, j, :]
    units, ok = unit_rows(mat)
    if not bool(ok.all()):
        raise PairtraceError(
            f"{int((~ok).sum())} of {len(ok)} behaviour vectors ({method}, layer {layer}) are zero or non-finite: "
            "r1 and r0 responses must differ"
        )
    return units


def iter_scores(store, behaviour_units: torch.Tensor, layer: int, method: str, chunk_rows: int) -> Iterator[
        tuple[int, torch.Tensor]]:
    """Yield ``(start_row, scores [rows])`` chunk by chunk over a vector store."""
    for start, chunk in store.iter_chunks(layer, rows=chunk_rows):
        yield start, score_chunk(chunk, behaviour_units, method)


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Indices ordering ``scores`` best-first; NaN last; ties by original position (stable)."""
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-key, kind="stable")
    nan_tail = np.isnan(scores[order])
    return np.concatenate([order[~nan_tail], order[nan_tail]])


@dataclass
class Ranking:
    """Pairs ranked best-first by attribution score.

    Attributes:
        table: DataFrame with columns :data:`RANKING_COLUMNS`, ordered best-first (``rank`` 1 = top).
        metadata: Method, layer, counts (``n_pairs``, ``n_nan``), identities of the inputs.
    """

    table: pd.DataFrame
    metadata: dict

    @property
    def ids(self) -> list[str]:
        """Pair ids best-first."""
        return self.table["id"].tolist()

    def top(self, k: int) -> list[str]:
        """Ids of the ``k`` best-ranked pairs that have a score."""
        scored = self.table[self.table["score"].notna()]
        return scored["id"].head(k).tolist()

    def __len__(self) -> int:
        return len(self.table)


def build_ranking(ids: Sequence[str], scores: np.ndarray, metadata: dict, *,
                  pair_metadata: pd.DataFrame | None = None) -> Ranking:
    """Assemble a :class:`Ranking` from ids and scores in store order.

    Args:
        ids: Pair ids in store order (row i of the dataset = ids[i]).
        scores: [n] scores in the same order; NaN for pairs without a score.
        metadata: JSON-ready description of how the scores were made.
        pair_metadata: Optional frame indexed by id with ``row``, ``source``, ``chosen_model``, ``rejected_model``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(ids) != len(scores):
        raise PairtraceError(f"{len(ids)} ids but {len(scores)} scores")
    order = rank_scores(scores)
    table = pd.DataFrame({"id": np.asarray(ids, dtype=object)[order], "row": order.astype(np.int64),
                          "score": scores[order]})
    table["rank"] = np.arange(1, len(table) + 1, dtype=np.int64)
    for col in ("source", "chosen_model", "rejected_model"):
        table[col] = None
    if pair_metadata is not None:
        meta = pair_metadata.set_index("id") if "id" in pair_metadata.columns else pair_metadata
        aligned = meta.reindex(table["id"])
        for col in ("source", "chosen_model", "rejected_model"):
            if col in aligned.columns:
                table[col] = aligned[col].to_numpy(dtype=object)
        if "row" in aligned.columns:
            table["row"] = aligned["row"].to_numpy(dtype=np.int64)
    table = table[list(RANKING_COLUMNS)].reset_index(drop=True)
    metadata = dict(metadata)
    metadata["n_pairs"] = len(table)
    metadata["n_nan"] = int(np.isnan(scores).sum())
    return Ranking(table=table, metadata=metadata)


def pair_metadata_frame(pairs) -> pd.DataFrame:
    """A frame of (id, row, source, chosen_model, rejected_model) for a ``PairSet`` or list of pairs."""
    return pd.DataFrame(
        {
            "id": [p.id for p in pairs],
            "row": [p.row for p in pairs],
            "source": [p.source for p in pairs],
            "chosen_model": [p.chosen_model for p in pairs],
            "rejected_model": [p.rejected_model for p in pairs],
        }
    )


def check_behaviour_matches_store(store, behaviour) -> None:
    """Refuse behaviour vectors made with another model, template or response pooling than the datapoint vectors."""
    store_model = dict(store.manifest.model or {})
    beh_meta = behaviour.metadata or {}
    beh_model = dict(beh_meta.get("model") or {})
    problems = []
    for key in ("weights_hash", "name", "revision"):
        a, b = store_model.get(key), beh_model.get(key)
        if key == "name" and a is not None and b is not None:
            # the same weights may be loaded from different paths; the hash decides
            continue
        if a is not None and b is not None and a != b:
            problems.append(f"model {key}: datapoint vectors {a!r} vs behaviour vectors {b!r}")
    store_tpl = store.manifest.template or {}
    beh_tpl = beh_meta.get("template") or {}
    for key in ("mode", "hash"):
        a, b = store_tpl.get(key), beh_tpl.get(key)
        if a is not None and b is not None and a != b:
            problems.append(f"template {key}: datapoint vectors {a!r} vs behaviour vectors {b!r}")
    # response means pooled over different parts of the responses live in different spaces
    store_pooling = ResponsePooling.from_settings(getattr(store.manifest, "settings", None))
    pooling_problem = store_pooling.mismatch(ResponsePooling.from_settings(beh_meta.get("settings")))
    if pooling_problem is not None:
        problems.append(pooling_problem)
    if problems:
        raise ManifestMismatchError(
            "behaviour vectors and datapoint vectors come from different settings: " + "; ".join(problems)
        )


def ranking_metadata(store: Any, behaviour: Any, config: AttributionConfig, layer: int, units: torch.Tensor,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata saved with a ranking: method, layer, config, and the model, template, dataset and behaviour
    vectors it came from (what :func:`load_ranking` callers check before comparing rankings)."""
    return {
        "kind": "ranking",
        "method": config.method,
        "layer": layer,
        "n_behaviour_vectors": int(units.shape[0]),
        "config": asdict(config),
        "model": dict(store.manifest.model or {}),
        "template": dict(store.manifest.template or {}),
        "dataset": dict(store.manifest.dataset or {}),
        "behaviour": {k: v for k, v in (behaviour.metadata or {}).items() if k not in ("model", "template")},
        "pairtrace_version": __version__,
        **(extra or {}),
    }


def compute_attribution(store, behaviour, config: AttributionConfig | None = None, *,
                        pair_metadata: pd.DataFrame | Sequence | None = None, progress: bool = True) -> Ranking:
    """Rank every pair of a vector store by cosine with behaviour vectors.

    Args:
        store: An open ``VectorStore`` of datapoint vectors.
        behaviour: ``BehaviourVectors`` from the same model and template.
        config: Method, layer and chunk size.
        pair_metadata: Optional (id, row, source, chosen_model, rejected_model) for the ranking columns: a frame,
            or a ``PairSet`` / list of pairs. By default, the store's own ``pairs.parquet`` when it has one.
        progress: Show a progress bar over chunks.

    Returns:
        The ranking, best-first.
    """
    from tqdm.auto import tqdm

    if pair_metadata is None:
        reader = getattr(store, "pair_metadata", None)
        pair_metadata = reader() if callable(reader) else None
    elif not isinstance(pair_metadata, pd.DataFrame):
        pair_metadata = pair_metadata_frame(pair_metadata)
    config, layer, units = resolve_scoring(store, behaviour, config)
    scores = np.full(store.n, np.nan, dtype=np.float64)
    n_chunks = max(1, math.ceil(store.n / config.chunk_rows))
    chunks = iter_scores(store, units, layer, config.method, config.chunk_rows)
    for start, chunk_scores in tqdm(chunks, total=n_chunks, desc=f"scoring ({config.method}, layer {layer})",
                                    disable=not progress, unit="chunk"):
        scores[start:start + len(chunk_scores)] = chunk_scores.numpy()
    metadata = ranking_metadata(store, behaviour, config, layer, units)
    ranking = build_ranking(list(store.ids), scores, metadata, pair_metadata=pair_metadata)
    if ranking.metadata["n_nan"]:
        logger.warning("%d of %d pairs have no score (zero or non-finite datapoint vector); they rank last",
                       ranking.metadata["n_nan"], len(ranking))
    return ranking


def save_ranking(ranking: Ranking, out_dir: str | Path, name: str = "ranking") -> Path:
    """Write ``{name}.parquet``, best-first ``{name}.jsonl`` and ``{name}.json`` (metadata) into ``out_dir``.

    Returns:
        Path of the Parquet file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(ranking.table, preserve_index=False)
    table = table.replace_schema_metadata({b"pairtrace": json.dumps(ranking.metadata).encode()})
    parquet = out / f"{name}.parquet"
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp)
    records = ranking.table.to_dict(orient="records")
    for rec in records:
        score = rec["score"]
        rec["score"] = None if score is None or (isinstance(score, float) and math.isnan(score)) else score
    write_jsonl_atomic(records, out / f"{name}.jsonl")
    write_text_atomic(json.dumps(ranking.metadata, indent=2, ensure_ascii=False), out / f"{name}.json")
    return parquet


def load_ranking(path: str | Path) -> Ranking:
    """Read a ranking written by :func:`save_ranking` (the Parquet file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ranking.parquet"
    if not path.exists():
        raise PairtraceError(f"no ranking at {path}")
    table = pq.read_table(path)
    missing = [c for c in RANKING_COLUMNS if c not in table.column_names]
    if missing:
        raise PairtraceError(f"{path} is not a ranking: missing columns {missing}")
    raw = (table.schema.metadata or {}).get(b"pairtrace")
    metadata = json.loads(raw) if raw else {}
    return Ranking(table=table.to_pandas(), metadata=metadata)
