"""Datapoint vectors (paper Def. 3.2) into a resumable store.

- datapoint vector  v_d = ā(prompt, chosen; M0, k) − ā(prompt, rejected; M0, k)

Datapoint extraction streams: the pairs are read twice in order (a scan that writes ``pairs.parquet`` and fixes the
manifest, then the extraction, one store shard at a time), so memory does not grow with the number of pairs when
the input is a :class:`pairtrace.shard.StreamedPairs`. ``shard="i/n"`` computes only part i of n of the store
shards (see :mod:`pairtrace.shard`). Behaviour vectors, probe and bank are in :mod:`pairtrace.behaviour`
(re-exported here, as the package's public API).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pairtrace.activations import (
    compute_pair_means,
    nonfinite_rows,
    resolve_batch_tokens,
)
from pairtrace.behaviour import (  # re-exported: the package's public API
    compute_behaviour_vectors,
    load_behaviour_vectors,
    load_triples,
    save_behaviour_vectors,
)
from pairtrace.data.pairs import compute_fingerprint
from pairtrace.data.types import Pair, PairSet
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.models import LoadedModel, build_teacher_forcing, effective_max_length, resolve_layers
from pairtrace.pooling import ResponsePooling
from pairtrace.shard import (
    InMemoryPairs,
    PairSource,
    ShardSpec,
    StreamedPairs,
    as_pair_source,
    iter_chunks,
    parse_shard,
)
from pairtrace.shared_prompt import DEFAULT_MIN_PROMPT_FRACTION, validate_prompt_sharing
from pairtrace.store import (
    MANIFEST_NAME,
    PAIRS_NAME,
    STORE_DTYPES,
    TRUNCATED_KEY,
    Manifest,
    PairMetadataWriter,
    VectorStore,
    build_expected,
    check_compatible,
    pooling_settings,
    remove_temporary_files,
    shard_path,
    shard_problem,
    write_shard,
)

logger = logging.getLogger(__name__)

INLINE_IDS_MAX = 100_000
"""Stores with more rows keep their ids only in ``pairs.parquet`` (manifest field ``ids_file``)."""
_RESUME_FIELDS = (
    "kind", "model", "layers", "template", "dataset", "ids", "shard_size", "dtype", "settings", "n_rows", "ids_file",
)


def _check_unique_ids(pairs: Sequence[Pair] | PairSet) -> None:
    seen: dict[str, int] = {}
    for p in pairs:
        if p.id in seen:
            raise DataError(f"pair at row {p.row} field 'id': id {p.id!r} repeats the pair at row {seen[p.id]}")
        seen[p.id] = p.row


def _reset_store(directory: Path) -> None:
    """Remove the manifest, pair metadata and shard files of a previous extraction in ``directory``
    (temporary files are left to the caller, which may be writing one)."""
    for path in directory.glob("shard-*.safetensors"):
        path.unlink()
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    (directory / PAIRS_NAME).unlink(missing_ok=True)


@dataclass
class ExtractionSettings:
    """How datapoint vectors are computed (speed only: the vectors are the same up to rounding)."""

    batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Token budget per forward pass (padded length x rows); None: the device's default "
                  "(2048 on CPU, 32768 on CUDA)."},
    )
    prompt_sharing: str = field(
        default="auto",
        metadata={"help": "auto: pack chosen and rejected with one shared prompt where the prompt is long; "
                  "always: wherever the prompts match in tokens; never: two plain sequences per pair."},
    )
    min_prompt_fraction: float = field(
        default=DEFAULT_MIN_PROMPT_FRACTION,
        metadata={"help": "auto shares a pair's prompt when it is at least this fraction of the pair's tokens."},
    )
    compile: bool | str = field(
        default=False, metadata={"help": "torch.compile the decoder blocks (True = inductor, or a backend name)."}
    )

    def __post_init__(self) -> None:
        validate_prompt_sharing(self.prompt_sharing)
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be at least 1, got {self.batch_tokens}")

    def describe(self, loaded: LoadedModel) -> dict[str, Any]:
        """JSON-ready record for the manifest's ``extraction`` field."""
        return {
            "batch_tokens": resolve_batch_tokens(self.batch_tokens, loaded.device),
            "prompt_sharing": self.prompt_sharing,
            "min_prompt_fraction": self.min_prompt_fraction,
            "compile": self.compile,
            "model_dtype": str(loaded.dtype).removeprefix("torch."),
            "device": str(loaded.device),
        }


def compute_shard_tensors(
    loaded: LoadedModel,
    pairs: Sequence[Pair],
    layers: Sequence[int],
    *,
    max_length: int = 2048,
    store_dtype: torch.dtype = torch.float32,
    settings: ExtractionSettings | None = None,
    response_tokens: int | None = None,
    pooling: ResponsePooling | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of one store shard: ``layer_{k}`` ``[m, d]`` datapoint vectors, ``n_response_tokens [m, 2]`` and
    ``truncated [m]`` (1 where the prompt or a response was cut to fit ``max_length``).

    Args:
        loaded: M0.
        pairs: The shard's pairs, in row order.
        layers: Resolved layers.
        max_length: Maximum tokens per sequence.
        store_dtype: Dtype of the stored vectors (computation is float32).
        settings: Batching and prompt sharing.
        response_tokens: Pool each response's first this many tokens (``None``: all).
        pooling: The response pooling (instead of ``response_tokens``).
    """
    settings = settings or ExtractionSettings()
    pooling = ResponsePooling.resolve(pooling, response_tokens)
    m = len(pairs)
    items = build_teacher_forcing(
        loaded, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], max_length,
        pooling=pooling,
    )
    chosen, rejected = compute_pair_means(
        loaded, items[:m], items[m:], list(layers), batch_tokens=settings.batch_tokens,
        prompt_sharing=settings.prompt_sharing, min_prompt_fraction=settings.min_prompt_fraction,
        compile=settings.compile, progress=False, pooling=pooling,
    )  # [m, L, d] each
    diff = chosen - rejected  # [m, L, d]
    counts = torch.tensor(
        [[items[i].n_response_tokens, items[m + i].n_response_tokens] for i in range(m)], dtype=torch.long
    ).reshape(m, 2)  # [m, 2]
    tensors = {f"layer_{k}": diff[:, j].to(store_dtype) for j, k in enumerate(layers)}
    stored = torch.stack([tensors[f"layer_{k}"].float() for k in layers], dim=1)  # [m, L, d] as written
    bad = int(nonfinite_rows(stored).sum())
    if bad:
        overflow = int((nonfinite_rows(stored) & ~nonfinite_rows(diff)).sum())
        logger.warning(
            "%d pair(s) have non-finite vectors (e.g. an empty response)%s", bad,
            f"; {overflow} of them only after the cast to {store_dtype} (values too large for it)" if overflow else "",
        )
    tensors["n_response_tokens"] = counts
    tensors[TRUNCATED_KEY] = torch.tensor(
        [items[i].truncated or items[m + i].truncated for i in range(m)], dtype=torch.uint8
    )
    return tensors


@dataclass
class _Scan:
    """What one read of the pairs established."""

    n: int
    fingerprint: str
    ids: list[str] | None  # None when the store keeps its ids only in pairs.parquet
    metadata: PairMetadataWriter


def _scan_pairs(
    source: PairSource, out_dir: Path, inline_ids_max: int, on_pair: Callable[[Pair], None] | None
) -> _Scan:
    """Read the pairs once: count them, fingerprint them and stream their metadata into a temporary Parquet file."""
    writer = PairMetadataWriter(out_dir / PAIRS_NAME)
    ids: list[str] | None = []

    def tap() -> Iterator[Pair]:
        nonlocal ids
        for pair in source.iter_pairs():
            writer.add(pair)
            if ids is not None:
                ids.append(pair.id)
                if len(ids) > inline_ids_max:
                    ids = None
            if on_pair is not None:
                on_pair(pair)
            yield pair

    try:
        computed = compute_fingerprint(tap())
    except BaseException:
        writer.discard()
        raise
    return _Scan(writer.n, source.fingerprint_hint() or computed, ids, writer)


def prepare_datapoint_store(
    loaded: LoadedModel,
    pairs: PairSet | PairSource | Sequence[Pair],
    out_dir: str | Path,
    *,
    layers: int | Sequence[int] | None = None,
    shard_size: int = 1024,
    max_length: int = 2048,
    resume: bool = True,
    dtype: str = "float32",
    shard: ShardSpec | str | None = None,
    inline_ids_max: int = INLINE_IDS_MAX,
    settings: ExtractionSettings | None = None,
    on_pair: Callable[[Pair], None] | None = None,
    response_tokens: int | None = None,
    pooling: ResponsePooling | None = None,
) -> Manifest:
    """Read the pairs once and set up the store directory: ``pairs.parquet`` and ``manifest.json``.

    The first half of :func:`compute_datapoint_vectors`, shared with the Ray backend. Resuming keeps the previous
    manifest when it matches; a part of a sharded run (``shard`` not 0/1) never deletes another part's files.

    Args:
        loaded: M0.
        pairs: The pairs (a :class:`PairSet`, a list of pairs or a :class:`pairtrace.shard.PairSource`).
        out_dir: Store directory (created if missing).
        layers: Layers (``None`` = default layer).
        shard_size: Pairs per shard.
        max_length: Maximum tokens per sequence.
        resume: Keep a matching previous store; if false, start over (only this part's shards when sharded).
        dtype: Storage dtype.
        shard: This process's part (``"i/n"``, ``"auto"``, a :class:`ShardSpec` or ``None`` for all).
        inline_ids_max: Above this many pairs, ids are kept only in ``pairs.parquet``.
        settings: Extraction settings, recorded in the manifest.
        on_pair: Called with every pair during the read (e.g. to stage pairs for workers).
        response_tokens: Pool each response's first this many tokens (``None``: all); recorded in the manifest's
            ``settings``, so stores and behaviour vectors pooled differently are never mixed.
        pooling: The response pooling (instead of ``response_tokens``).

    Returns:
        The manifest in force (the previous one when resuming).

    Raises:
        ManifestMismatchError: ``out_dir`` holds a store made with other settings (with ``resume``, or as a part
            of a sharded run).
        DataError: Duplicate pair ids, or shard files without a manifest in ``out_dir``.
        ConfigError: Bad layer, shard size, dtype or shard spec.
    """
    layers = resolve_layers(layers, loaded.n_layers)
    pooling = ResponsePooling.resolve(pooling, response_tokens)
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(STORE_DTYPES)}")
    spec = parse_shard(shard)
    settings = settings or ExtractionSettings()
    source = as_pair_source(pairs)
    if isinstance(source, InMemoryPairs):
        _check_unique_ids(source.pairs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scan = _scan_pairs(source, out_dir, inline_ids_max, on_pair)
    try:
        n = scan.n
        if n == 0:
            raise DataError(_no_pairs_message(source))
        expected = build_expected(loaded, layers)
        manifest = Manifest(
            kind="datapoint",
            model=expected["model"],
            layers=layers,
            template=expected["template"],
            dataset={"origin": source.origin, "fingerprint": scan.fingerprint, "n_pairs": n},
            ids=scan.ids if scan.ids is not None else [],
            shard_size=shard_size,
            dtype=dtype,
            n_shards=(n + shard_size - 1) // shard_size,
            hidden_size=loaded.hidden_size,
            settings=pooling_settings(max_length, pooling),
            n_rows=None if scan.ids is not None else n,
            ids_file=None if scan.ids is not None else PAIRS_NAME,
            extraction=settings.describe(loaded),
            truncation=truncation_settings(loaded, max_length),
        )
        manifest_path = out_dir / MANIFEST_NAME
        if manifest_path.exists() and (resume or not spec.is_whole):
            previous = Manifest.load(out_dir)
            try:
                check_compatible(manifest.to_dict(), previous, fields=_RESUME_FIELDS, where=str(out_dir))
            except ManifestMismatchError as exc:
                hint = (
                    "extract into another folder, or delete this one to start over" if spec.is_whole
                    else "every part of a sharded run needs the same settings; empty the directory to start over"
                )
                raise ManifestMismatchError(f"{exc} ({hint})") from None
            if not resume:  # a part starting over removes only its own shards
                for index in spec.units(previous.n_shards):
                    shard_path(out_dir, index).unlink(missing_ok=True)
            manifest = previous
            manifest.truncation = {**manifest.truncation, **truncation_settings(loaded, max_length),
                                   "n_truncated_pairs": None}
        elif manifest_path.exists():
            _reset_store(out_dir)
        elif any(out_dir.glob("shard-*.safetensors")):
            raise DataError(f"{out_dir}: holds shard files but no {MANIFEST_NAME}; use an empty directory")
    except BaseException:
        scan.metadata.discard()
        raise
    scan.metadata.commit()
    manifest.save(out_dir)
    if spec.is_whole:  # other parts may be writing temporary files right now
        remove_temporary_files(out_dir)
    return manifest


def extract_datapoint_shards(
    loaded: LoadedModel,
    pairs: PairSet | PairSource | Sequence[Pair],
    out_dir: str | Path,
    manifest: Manifest,
    *,
    shard: ShardSpec | str | None = None,
    settings: ExtractionSettings | None = None,
    progress: bool = True,
) -> list[int]:
    """Compute and write the missing store shards that belong to this part (the second half of
    :func:`compute_datapoint_vectors`).

    Reads the pairs in order, one store shard at a time; shards already on disk or owned by other parts are
    skipped. A streamed input is fingerprinted again on the way and must not have changed since the scan.

    Returns:
        The shard indices written.

    Raises:
        DataError: The input changed since the manifest was written.
    """
    spec = parse_shard(shard)
    settings = settings or ExtractionSettings()
    source = as_pair_source(pairs)
    out_dir = Path(out_dir)
    layers = list(manifest.layers)
    store_dtype = STORE_DTYPES[manifest.dtype]
    mine = []
    for index in spec.units(manifest.n_shards):
        path = shard_path(out_dir, index)
        problem = shard_problem(path) if path.is_file() else "missing"
        if problem not in (None, "missing"):
            logger.warning("%s: damaged shard, %s; computing it again", path, problem)
            path.unlink()
        if problem is not None:
            mine.append(index)
    owned = len(spec.units(manifest.n_shards))
    if len(mine) < owned:
        logger.info("resuming %s: keeping %d finished shard(s) of %d, computing %d", out_dir, owned - len(mine),
                    owned, len(mine))
    todo = set(mine)
    written: list[int] = []
    verify = source.fingerprint_hint() is None  # a streamed input is read again: check it did not change
    n_read = 0
    total = sum(manifest.shard_range(i)[1] - manifest.shard_range(i)[0] for i in mine)

    def work(bar: tqdm) -> Iterator[Pair]:
        nonlocal n_read
        for index, chunk in enumerate(iter_chunks(source.iter_pairs(), manifest.shard_size)):
            yield from chunk  # the consumer fingerprints every pair
            n_read += len(chunk)
            start, end = manifest.shard_range(index)
            if index not in todo or len(chunk) != end - start:
                continue
            tensors = compute_shard_tensors(
                loaded, chunk, layers, max_length=manifest.settings.get("max_length", 2048),
                store_dtype=store_dtype, settings=settings, pooling=manifest.pooling,
            )
            write_shard(out_dir, index, tensors)
            written.append(index)
            bar.update(len(chunk))
            if not verify and len(written) == len(mine):
                return

    with tqdm(total=total, desc="datapoint vectors", disable=not progress, unit="pair") as bar:
        fingerprint = compute_fingerprint(work(bar))
    if verify and (n_read != manifest.n or fingerprint != manifest.dataset.get("fingerprint")):
        raise DataError(
            f"{source.origin}: the pairs changed since {out_dir / MANIFEST_NAME} was written "
            f"(now {n_read} pairs, fingerprint {fingerprint[:12]}...); extract into a new directory"
        )
    return written


def compute_datapoint_vectors(
    loaded: LoadedModel,
    pairs: PairSet | PairSource | Sequence[Pair],
    out_dir: str | Path,
    *,
    layers: int | Sequence[int] | None = None,
    shard_size: int = 1024,
    batch_tokens: int | None = None,
    max_length: int = 2048,
    resume: bool = True,
    progress: bool = True,
    dtype: str = "float32",
    prompt_sharing: str = "auto",
    min_prompt_fraction: float = DEFAULT_MIN_PROMPT_FRACTION,
    compile: bool | str = False,
    shard: ShardSpec | str | None = None,
    inline_ids_max: int = INLINE_IDS_MAX,
    response_tokens: int | None = None,
    pooling: ResponsePooling | None = None,
) -> VectorStore:
    """Extract v_d = ā(prompt, chosen; M0, k) − ā(prompt, rejected; M0, k) for every pair into a vector store.

    Shard ``i`` holds pairs ``[i * shard_size, (i + 1) * shard_size)`` in input order. The manifest and
    ``pairs.parquet`` (id, row, source, chosen_model, rejected_model) are written before any shard; each shard is
    written atomically, so an interrupted run resumes where it stopped and gives the same bytes as an
    uninterrupted one. With a :class:`pairtrace.shard.StreamedPairs` input, memory stays flat in the number of
    pairs.

    Args:
        loaded: M0.
        pairs: The preference pairs: a :class:`PairSet`, a list of pairs, or a streaming pair source.
        out_dir: Store directory (created if missing).
        layers: Layers to extract (``None`` = default layer); all come from one forward pass per batch.
        shard_size: Pairs per shard.
        batch_tokens: Token budget per forward pass (``None``: 2048 on CPU, 32768 on CUDA).
        max_length: Maximum tokens per sequence (prompt cut from the left first).
        resume: Keep finished shards of a previous run with the same manifest; if false, start over (the
            previous manifest and shards in ``out_dir`` are deleted; a part of a sharded run deletes only its own).
        progress: Show a progress bar over pairs.
        dtype: Storage dtype: float32, bfloat16 or float16 (computation is always float32).
        prompt_sharing: ``auto``, ``always`` or ``never`` (see :mod:`pairtrace.shared_prompt`).
        min_prompt_fraction: Threshold of ``auto``.
        compile: ``torch.compile`` the decoder blocks (``True`` = inductor, or a backend name).
        shard: Compute only part ``i`` of ``n`` of the shards (``"i/n"``, ``"auto"`` from the launcher's
            environment, or a :class:`pairtrace.shard.ShardSpec`); the others are left to other processes.
        inline_ids_max: Above this many pairs the manifest refers to ``pairs.parquet`` for the ids.
        response_tokens: Average each response's first this many tokens only (``None``: every response token,
            the paper's mean).
        pooling: The response pooling (instead of ``response_tokens``; see :mod:`pairtrace.pooling`).

    Returns:
        The store (complete, unless this is one part of a sharded run: then open with ``allow_incomplete``).

    Raises:
        ManifestMismatchError: ``out_dir`` holds a store made with another model, layer, template, dataset,
            shard size, dtype or ``max_length`` (with ``resume``).
        DataError: Duplicate pair ids, or shard files without a manifest in ``out_dir``.
        ConfigError: Bad layer, shard size, dtype, batch size, prompt-sharing mode or shard spec.
    """
    settings = ExtractionSettings(
        batch_tokens=batch_tokens, prompt_sharing=prompt_sharing, min_prompt_fraction=min_prompt_fraction,
        compile=compile,
    )
    spec = parse_shard(shard)
    source = as_pair_source(pairs)
    manifest = prepare_datapoint_store(
        loaded, source, out_dir, layers=layers, shard_size=shard_size, max_length=max_length, resume=resume,
        dtype=dtype, shard=spec, inline_ids_max=inline_ids_max, settings=settings,
        pooling=ResponsePooling.resolve(pooling, response_tokens),
    )
    extract_datapoint_shards(loaded, source, out_dir, manifest, shard=spec, settings=settings, progress=progress)
    store = VectorStore.open(out_dir, allow_incomplete=not spec.is_whole)
    if store.complete:
        record_truncation(store)
    return store


def truncation_settings(loaded: LoadedModel, max_length: int) -> dict[str, Any]:
    """The manifest's ``truncation`` entry before extraction: requested and effective ``max_length`` and the
    model's maximum positions (the effective value is clamped to them, with a warning)."""
    return {"max_length": max_length, "effective_max_length": effective_max_length(loaded, max_length),
            "max_positions": loaded.max_positions, "n_truncated_pairs": None}


def record_truncation(store: VectorStore) -> int | None:
    """Count the complete store's truncated pairs into its manifest (``truncation.n_truncated_pairs``) and log them.

    Returns:
        The count, or None when some shard does not record it (written before shards did).
    """
    count = store.n_truncated_pairs()
    manifest = store.manifest
    if manifest.truncation.get("n_truncated_pairs") != count:
        manifest.truncation = {**manifest.truncation, "n_truncated_pairs": count}
        manifest.save(store.directory)
    if count:
        logger.warning(
            "%d of %d pair(s) had their prompt or a response cut to fit %s tokens (prompts from the left, responses "
            "from the right)", count, store.n, manifest.truncation.get("effective_max_length", "max_length"),
        )
    return count


def _no_pairs_message(source: PairSource) -> str:
    """Why a store would be empty: the input's name and, for a streamed one, its skipped records."""
    skipped = getattr(source, "n_skipped", 0)
    if skipped:
        first = "; ".join(str(bad) for bad in getattr(source, "first_skipped", [])[:3])
        return f"{source.origin}: no valid pairs ({skipped} bad record(s) skipped; first: {first})"
    return f"{source.origin}: no pairs to extract (the input is empty, or the limit is 0)"


def compute_datapoint_vectors_from_source(
    loaded: LoadedModel,
    source: str | os.PathLike,
    out_dir: str | Path,
    *,
    format: str = "auto",
    split: str | None = None,
    revision: str | None = None,
    strict: bool = False,
    id_column: str | None = None,
    limit: int | None = None,
    **kwargs: Any,
) -> VectorStore:
    """:func:`compute_datapoint_vectors` reading the pairs straight from a file or dataset, never all at once.

    The pairs are the ones :func:`pairtrace.data.pairs.load_pairs` would read with the same arguments (same
    ids, same skipped records, same fingerprint), so the store is interchangeable with one made from a loaded set.

    Args:
        loaded: M0.
        source: JSON Lines, JSON, Parquet, a saved dataset folder or a hub id.
        out_dir: Store directory.
        format: Record layout.
        split: Dataset split.
        revision: Hub revision.
        strict: Stop at the first bad record.
        id_column: Column holding the id.
        limit: Read at most this many records.
        **kwargs: Any other argument of :func:`compute_datapoint_vectors`.
    """
    stream = StreamedPairs(
        source, format=format, split=split, revision=revision, strict=strict, id_column=id_column, limit=limit
    )
    return compute_datapoint_vectors(loaded, stream, out_dir, **kwargs)


__all__ = [
    "INLINE_IDS_MAX",
    "ExtractionSettings",
    "compute_behaviour_vectors",
    "compute_datapoint_vectors",
    "compute_datapoint_vectors_from_source",
    "compute_shard_tensors",
    "extract_datapoint_shards",
    "load_behaviour_vectors",
    "load_triples",
    "prepare_datapoint_store",
    "save_behaviour_vectors",
]
