"""Scoring at scale: millions of datapoint vectors against thousands of behaviour vectors, in flat memory.

The same cosine scores as :func:`pairtrace.attribute.compute_attribution` (probe, bank = true max, mean), from the
same code (:func:`pairtrace.attribute.score_chunk`), run on any device, with faiss, or split over processes:

    X  [rows, d]  one chunk of datapoint vectors, read from the store's shards (float32)
    U  [m, d]     unit behaviour vectors
    score = reduce_m(unit(X) @ U.T)   [rows]  (max / mean / the one probe column)

Memory is one chunk and its working copies plus ``[rows, m]`` cosines plus the ``[n]`` scores, whatever n is.
Scoring can be split over processes (``--shard i/n``): each part scores the store shards it owns into a Parquet
part, and :func:`merge_score_parts` checks that every row was scored exactly once and builds the ranking.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pairtrace.attribute import (
    AttributionConfig,
    Ranking,
    build_ranking,
    pair_metadata_frame,
    ranking_metadata,
    resolve_scoring,
    score_chunk,
)
from pairtrace.errors import ConfigError, DataError
from pairtrace.records import atomic_path
from pairtrace.shard import ShardSpec, parse_shard

ENGINES = ("torch", "faiss")
"""``torch``: chunked matrix products (CPU or GPU); ``faiss``: exact inner-product search (probe and bank)."""
PART_PATTERN = "scores.shard-{:05d}-of-{:05d}.parquet"
_ZERO_NORM = 1e-12


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _check_engine(engine: str, method: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"scoring engine {engine!r} is not one of {list(ENGINES)}")
    if engine == "faiss":
        if method == "mean":
            raise ConfigError("the faiss engine scores probe and bank (a max); use engine='torch' for 'mean'")
        if not faiss_available():
            raise ConfigError("engine='faiss' needs the faiss package (pip install faiss-cpu)")


def score_rows(chunk: torch.Tensor, units: torch.Tensor, method: str, engine: str = "torch") -> torch.Tensor:
    """Cosine scores of one chunk of datapoint vectors.

    Args:
        chunk: ``[rows, d]`` float32 datapoint vectors on the scoring device, overwritten: the torch engine
            normalises it in place; the faiss engine zeroes rows without a direction (zero norm, NaN or infinity).
        units: ``[m, d]`` float32 unit behaviour vectors on the same device.
        method: ``probe`` (m = 1), ``bank`` (max over m) or ``mean`` (mean over m).
        engine: ``torch`` (:func:`pairtrace.attribute.score_chunk`, what ``compute_attribution`` runs) or
            ``faiss`` (CPU, probe and bank: an exact inner-product search divided by the row norm).

    Returns:
        ``[rows]`` float32 scores on the chunk's device, NaN where the vector has no direction.
    """
    if engine != "faiss":
        return score_chunk(chunk, units, method, inplace=True)  # the chunk is this scorer's own copy
    import faiss

    norms = torch.linalg.vector_norm(chunk, dim=1)  # [rows]; NaN or inf when a row is not finite
    ok = torch.isfinite(norms) & (norms > _ZERO_NORM)
    if not bool(ok.all()):
        chunk[~ok] = 0.0
    xq = np.ascontiguousarray(chunk.cpu().numpy(), dtype=np.float32)
    xb = np.ascontiguousarray(units.cpu().numpy(), dtype=np.float32)
    best, _ = faiss.knn(xq, xb, 1, metric=faiss.METRIC_INNER_PRODUCT)  # [rows, 1]: the largest inner product
    scores = torch.from_numpy(best[:, 0]).to(chunk.device) / norms.clamp_min(_ZERO_NORM)
    scores[~ok] = float("nan")
    return scores


def _move(chunk: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return chunk.pin_memory().to(device, non_blocking=True)
    return chunk


def score_store(
    store,
    units: torch.Tensor,
    *,
    layer: int,
    method: str,
    chunk_rows: int = 16384,
    device: str | torch.device = "cpu",
    engine: str = "torch",
    row_ranges: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Score the rows of a vector store chunk by chunk.

    Args:
        store: An open :class:`pairtrace.store.VectorStore`.
        units: ``[m, d]`` unit behaviour vectors (see :func:`pairtrace.attribute.behaviour_matrix`).
        layer: Stored layer to score.
        method: ``probe``, ``bank`` or ``mean``.
        chunk_rows: Rows per chunk.
        device: Where the products run (``cpu``, ``cuda``...).
        engine: ``torch`` or ``faiss``.
        row_ranges: Only these ``[start, end)`` ranges (default: every row, store shard by store shard).
        progress: Show a progress bar.

    Returns:
        ``[n]`` float64 scores in row order; NaN for rows without a direction and rows outside ``row_ranges``.

    Chunks never cross a store shard: a BLAS product's rounding can depend on how many rows it multiplies at once,
    so scoring the whole store and scoring it in parts (:func:`score_store_part`) must cut the same chunks to give
    bit-identical scores.
    """
    _check_engine(engine, method)
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
    device = torch.device(device)
    units = units.to(device=device, dtype=torch.float32)
    if row_ranges is not None:
        ranges = list(row_ranges)
    else:
        ranges = [store.manifest.shard_range(j) for j in range(store.manifest.n_shards)] or [(0, store.n)]
    spans = [(s, min(s + chunk_rows, e)) for a, e in ranges for s in range(a, e, chunk_rows)]
    scores = np.full(store.n, np.nan, dtype=np.float64)
    with torch.inference_mode():
        for start, end in tqdm(spans, desc=f"scoring ({method}, layer {layer})", disable=not progress, unit="chunk"):
            chunk = _move(store.read_rows(layer, start, end), device)  # [rows, d]
            scores[start:end] = score_rows(chunk, units, method, engine).cpu().numpy()
    return scores


def _metadata_frame(store, pair_metadata) -> pd.DataFrame | None:
    if pair_metadata is None:
        return store.pair_metadata() if hasattr(store, "pair_metadata") else None
    return pair_metadata if isinstance(pair_metadata, pd.DataFrame) else pair_metadata_frame(pair_metadata)


def rank_store(
    store,
    behaviour,
    config: AttributionConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    engine: str = "torch",
    pair_metadata=None,
    progress: bool = True,
) -> Ranking:
    """:func:`pairtrace.attribute.compute_attribution` on any device or with faiss, chunks cut at store shards.

    Args:
        store: An open vector store.
        behaviour: Behaviour vectors from the same model and template.
        config: Method, layer and chunk size (``chunk_rows``).
        device: Where the products run.
        engine: ``torch`` or ``faiss``.
        pair_metadata: A frame, a ``PairSet`` or a list of pairs; default: the store's ``pairs.parquet``.
        progress: Show a progress bar.

    Returns:
        The ranking, best-first (the scores of ``compute_attribution``, up to float32 rounding where the chunks
        differ, and to faiss's rounding).
    """
    config, layer, units = resolve_scoring(store, behaviour, config)
    scores = score_store(store, units, layer=layer, method=config.method, chunk_rows=config.chunk_rows,
                         device=device, engine=engine, progress=progress)
    metadata = ranking_metadata(store, behaviour, config, layer, units, {"engine": engine})
    return build_ranking(list(store.ids), scores, metadata, pair_metadata=_metadata_frame(store, pair_metadata))


def part_path(directory: str | Path, shard: ShardSpec) -> Path:
    """Path of the scores of part ``shard`` in ``directory``."""
    return Path(directory) / PART_PATTERN.format(shard.index, shard.count)


def score_store_part(
    store,
    behaviour,
    config: AttributionConfig | None,
    shard: ShardSpec | str,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    engine: str = "torch",
    progress: bool = True,
) -> Path:
    """Score the store shards owned by one part and write them as ``(row, score)`` Parquet.

    Part ``i`` of ``n`` scores the rows of store shards ``j`` with ``j % n == i``.

    Returns:
        The part file (``scores.shard-0000i-of-0000n.parquet`` in ``out_dir``), written atomically.
    """
    spec = parse_shard(shard)
    config, layer, units = resolve_scoring(store, behaviour, config)
    ranges = [store.manifest.shard_range(j) for j in spec.units(store.manifest.n_shards)]
    scores = score_store(store, units, layer=layer, method=config.method, chunk_rows=config.chunk_rows,
                         device=device, engine=engine, row_ranges=ranges, progress=progress)
    rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]) if ranges else np.empty(0, np.int64)
    table = pa.table({"row": rows, "score": scores[rows]})
    info = {"method": config.method, "layer": layer, "n_rows": store.n, "shard": str(spec),
            "dataset": dict(store.manifest.dataset or {}), "n_behaviour_vectors": int(units.shape[0])}
    table = table.replace_schema_metadata({b"pairtrace": json.dumps(info).encode()})
    out = part_path(out_dir, spec)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def merge_score_parts(
    store,
    behaviour,
    config: AttributionConfig | None,
    parts_dir: str | Path,
    *,
    pair_metadata=None,
) -> Ranking:
    """Build the ranking from the parts written by :func:`score_store_part`.

    Raises:
        DataError: Parts are missing, overlap, disagree on the method/layer/dataset, or leave rows unscored.
    """
    config, layer, units = resolve_scoring(store, behaviour, config)
    files = sorted(Path(parts_dir).glob(PART_PATTERN.replace("{:05d}", "*")))
    if not files:
        raise DataError(f"{parts_dir}: no score parts ({PART_PATTERN.format(0, 1)}, ...)")
    scores = np.full(store.n, np.nan, dtype=np.float64)
    covered = np.zeros(store.n, dtype=bool)
    counts = set()
    for path in files:
        table = pq.read_table(path)
        info = json.loads((table.schema.metadata or {}).get(b"pairtrace", b"{}"))
        want = {"method": config.method, "layer": layer, "n_rows": store.n,
                "dataset": dict(store.manifest.dataset or {})}
        wrong = [k for k, v in want.items() if info.get(k) != v]
        if wrong:
            raise DataError(f"{path}: field(s) {wrong} do not match this store and configuration")
        counts.add(int(str(info.get("shard", "0/1")).split("/")[1]))
        rows = table.column("row").to_numpy()
        if covered[rows].any():
            raise DataError(f"{path}: scores rows that another part already scored")
        covered[rows] = True
        scores[rows] = table.column("score").to_numpy()
    if len(counts) != 1 or len(files) != next(iter(counts)):
        raise DataError(f"{parts_dir}: found {len(files)} part file(s) for part counts {sorted(counts)}")
    if not covered.all():
        raise DataError(f"{parts_dir}: {int((~covered).sum())} of {store.n} rows were not scored by any part")
    extra = {"engine": "parts", "n_parts": len(files)}
    metadata = ranking_metadata(store, behaviour, config, layer, units, extra)
    return build_ranking(list(store.ids), scores, metadata, pair_metadata=_metadata_frame(store, pair_metadata))


def estimate_scoring_flops(n: int, d: int, m: int) -> float:
    """Floating-point operations of scoring n vectors of width d against m behaviour vectors (2·n·d·m)."""
    return 2.0 * n * d * m


def chunk_memory_bytes(chunk_rows: int, d: int, m: int) -> int:
    """Peak bytes of scoring one float32 chunk in place with :func:`pairtrace.attribute.score_chunk`.

    The chunk (``[rows, d]`` float32, normalised in place), its finiteness mask (``[rows, d]`` bool) and the
    ``[rows, m]`` float32 cosines. A chunk holding rows without a direction adds one NaN-free float32 copy.
    """
    return chunk_rows * (4 * d + d + 4 * m)


def suggest_chunk_rows(d: int, m: int, budget_bytes: int = 1 << 30) -> int:
    """Largest power of two of rows whose chunk fits ``budget_bytes`` (:func:`chunk_memory_bytes`; at least 256)."""
    rows = max(1, budget_bytes // chunk_memory_bytes(1, d, m))
    return max(256, 1 << int(math.log2(rows)))


__all__ = [
    "ENGINES",
    "chunk_memory_bytes",
    "estimate_scoring_flops",
    "faiss_available",
    "merge_score_parts",
    "part_path",
    "rank_store",
    "score_rows",
    "score_store",
    "score_store_part",
    "suggest_chunk_rows",
]
