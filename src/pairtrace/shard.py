"""Splitting heavy stages over processes and machines: shard specs, streaming pair sources, merging.

A stage run with ``--shard i/n`` does the part ``i`` of ``n`` (0-based) of the work and writes it where the other
parts write theirs; a merge step checks that every part is there and assembles the result. For datapoint vectors
the unit of work is a store shard (a fixed range of ``shard_size`` pairs): part ``i`` computes the store shards
``j`` with ``j % n == i`` (round-robin, so parts of a length-sorted file get similar work), every part writes the
same manifest and ``pairs.parquet``, and the parts either share one output directory (a shared filesystem) or
write separate ones that :func:`merge_stores` joins.

``--shard auto`` reads the launcher's environment: ``torchrun`` / ``accelerate launch`` (``RANK``,
``WORLD_SIZE``), SLURM job arrays (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_MIN``)
and ``srun`` tasks (``SLURM_PROCID``, ``SLURM_NTASKS``).

Pair sources: a :class:`PairSource` hands the pairs out in order, as many times as asked, without holding them
all: :class:`StreamedPairs` re-reads a file (JSON Lines, Parquet, a saved or hub dataset) with exactly the rules
of :func:`pairtrace.data.pairs.load_pairs`; :class:`InMemoryPairs` wraps a loaded :class:`PairSet`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pairtrace.data.layouts import pair_from_record
from pairtrace.data.readers import iter_records
from pairtrace.data.types import SKIPPED_LISTED, BadRecord, Pair, PairSet, describe_skipped
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.records import atomic_path
from pairtrace.store import (
    MANIFEST_NAME,
    PAIRS_NAME,
    Manifest,
    VectorStore,
    check_compatible,
    remove_temporary_files,
    shard_path,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

STORE_FIELDS = (
    "kind", "model", "layers", "template", "dataset", "ids", "shard_size", "dtype", "settings", "n_rows", "ids_file",
)
"""Manifest fields that must agree between parts of one store."""

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class ShardSpec:
    """Part ``index`` of ``count`` (0-based).

    Attributes:
        index: This part, ``0 <= index < count``.
        count: Number of parts.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: need 0 <= i < n (0-based part i of n parts)")

    @property
    def is_whole(self) -> bool:
        """Whether this is the only part."""
        return self.count == 1

    def owns(self, unit: int) -> bool:
        """Whether work unit ``unit`` (e.g. a store shard index) belongs to this part (round-robin)."""
        return unit % self.count == self.index

    def units(self, n_units: int) -> list[int]:
        """The units of ``range(n_units)`` that belong to this part."""
        return list(range(self.index, n_units, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_from_env(environ: Mapping[str, str] | None = None) -> ShardSpec:
    """The part this process is, read from the launcher's environment.

    Order: ``torchrun``/``accelerate`` (``RANK``, ``WORLD_SIZE``), then a SLURM job array
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), then ``srun`` tasks
    (``SLURM_PROCID`` of ``SLURM_NTASKS``); otherwise the whole job (0/1).

    Args:
        environ: Environment to read (default: ``os.environ``).
    """
    env = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        value = env.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc

    world, rank = number("WORLD_SIZE"), number("RANK")
    if world is not None and world > 1 and rank is not None:
        return ShardSpec(rank, world)
    task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
    if task is not None and count is not None and count > 1:
        return ShardSpec(task - (number("SLURM_ARRAY_TASK_MIN") or 0), count)
    procid, ntasks = number("SLURM_PROCID"), number("SLURM_NTASKS")
    if procid is not None and ntasks is not None and ntasks > 1:
        return ShardSpec(procid, ntasks)
    return ShardSpec()


def parse_shard(value: str | ShardSpec | None) -> ShardSpec:
    """Parse ``--shard``: ``"i/n"`` (0-based), ``"auto"`` (from the environment, see :func:`shard_from_env`) or
    nothing (the whole job).

    Raises:
        ConfigError: Anything else, or ``i`` not in ``0..n-1``.
    """
    if value is None or isinstance(value, ShardSpec):
        return value or ShardSpec()
    if value.strip() == "auto":
        return shard_from_env()
    match = _SHARD_RE.match(value)
    if not match:
        raise ConfigError(f"--shard {value!r}: expected i/n (0-based part i of n, e.g. 0/4) or auto")
    return ShardSpec(int(match.group(1)), int(match.group(2)))


def device_for_rank(environ: Mapping[str, str] | None = None) -> str:
    """``cuda:LOCAL_RANK`` under ``torchrun``/``accelerate`` on a GPU machine, else ``auto``."""
    import torch

    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK") or env.get("SLURM_LOCALID")
    if local is not None and torch.cuda.is_available():
        return f"cuda:{int(local) % max(1, torch.cuda.device_count())}"
    return "auto"


def select_shard(items: Iterable[T], shard: ShardSpec) -> list[T]:
    """The items of one part: item ``j`` belongs to part ``j % n`` (e.g. prompt records for generation)."""
    return [item for j, item in enumerate(items) if shard.owns(j)]


def shard_file_name(name: str, shard: ShardSpec) -> str:
    """``name`` with the part in it: ``generations.jsonl`` -> ``generations.shard-00001-of-00004.jsonl``."""
    if shard.is_whole:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.shard-{shard.index:05d}-of-{shard.count:05d}{dot}{suffix}"


# --------------------------------------------------------------------------------------------------------------
# Pair sources
# --------------------------------------------------------------------------------------------------------------


class PairSource(Protocol):
    """Pairs handed out in dataset order, as many times as asked."""

    origin: str

    def iter_pairs(self) -> Iterator[Pair]:
        """Yield the pairs in order."""
        ...

    def fingerprint_hint(self) -> str | None:
        """A fingerprint known without reading (a loaded set's), else ``None``."""
        ...


class InMemoryPairs:
    """A loaded :class:`PairSet` as a pair source."""

    def __init__(self, pairs: PairSet) -> None:
        self.pairs = pairs
        self.origin = pairs.origin

    def iter_pairs(self) -> Iterator[Pair]:
        """Yield the pairs in order."""
        return iter(self.pairs.pairs)

    def fingerprint_hint(self) -> str | None:
        """The set's own fingerprint, if it has one."""
        return self.pairs.fingerprint or None

    def __len__(self) -> int:
        return len(self.pairs)


class StreamedPairs:
    """Pairs read from a file or dataset one record at a time, never all held.

    Reads exactly what :func:`pairtrace.data.pairs.load_pairs` would: the same records become pairs, bad records
    are skipped (or raise with ``strict``), a repeated id is skipped as a bad record, and the fingerprint of the
    pairs is the same. Only the ids seen so far are kept (to find repeats), a few dozen bytes per pair.

    Args:
        source: JSON Lines (``.jsonl``, ``.jsonl.gz``), JSON array, Parquet, a ``save_to_disk`` folder or a hub id.
        format: Record layout (``auto``, ``standard``, ``conversational``, ``olmo``, ``hh``).
        split: Dataset split.
        revision: Hub revision.
        strict: Raise at the first bad record.
        id_column: Column holding the id.
        limit: Read at most this many records.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        format: str = "auto",
        split: str | None = None,
        revision: str | None = None,
        strict: bool = False,
        id_column: str | None = None,
        limit: int | None = None,
    ) -> None:
        self.source = source
        self.origin = str(source)
        self.format = format
        self.split = split
        self.revision = revision
        self.strict = strict
        self.id_column = id_column
        self.limit = limit
        self.n_skipped = 0
        self.first_skipped: list[BadRecord] = []
        self._reported = False

    def fingerprint_hint(self) -> str | None:
        """Unknown until read."""
        return None

    def iter_pairs(self) -> Iterator[Pair]:
        """Read the input and yield its valid pairs in order (counting skipped records in :attr:`n_skipped`)."""
        seen: set[str] = set()
        self.n_skipped, self.first_skipped = 0, []
        records = iter_records(self.source, split=self.split, revision=self.revision, limit=self.limit)
        n_records = 0
        for raw in records:
            n_records += 1
            result = raw.bad if raw.bad is not None else pair_from_record(
                raw.data, raw.row, raw.line, layout=self.format, id_column=self.id_column
            )
            if isinstance(result, Pair) and result.id in seen:
                result = BadRecord(raw.row, raw.line, self.id_column or "id", f"duplicate id '{result.id}'")
            if isinstance(result, BadRecord):
                if self.strict:
                    raise DataError(f"{result} (in {self.origin})")
                self.n_skipped += 1
                if len(self.first_skipped) < SKIPPED_LISTED:
                    self.first_skipped.append(result)
                continue
            seen.add(result.id)
            yield result
        if self.n_skipped and not self._reported:  # the input is read more than once: say it once
            self._reported = True
            logger.warning("%s", describe_skipped(self.first_skipped, self.n_skipped, n_records, self.origin))


def as_pair_source(pairs: PairSet | PairSource | Sequence[Pair]) -> PairSource:
    """Wrap a :class:`PairSet` (or a list of pairs) as a source; a source is returned as it is."""
    if isinstance(pairs, PairSet):
        return InMemoryPairs(pairs)
    if isinstance(pairs, list | tuple):
        return InMemoryPairs(PairSet(pairs=list(pairs), origin="memory"))
    if hasattr(pairs, "iter_pairs"):
        return pairs  # type: ignore[return-value]
    raise ConfigError(f"expected a PairSet, a list of pairs or a pair source, got {type(pairs).__name__}")


def iter_chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem) or copy it, through a temporary name."""
    with atomic_path(dst) as tmp:
        tmp.unlink()  # os.link needs a free name
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def merge_stores(parts: Sequence[str | Path], out_dir: str | Path) -> VectorStore:
    """Join the parts of a sharded extraction into one complete store.

    Every part is a store directory holding the full manifest and some of the shards (a directory may appear
    once, e.g. when all parts wrote into ``out_dir`` itself). The manifests must agree on every field that
    defines the vectors; each shard is taken from the first part that has it (hard-linked when possible).

    Args:
        parts: Store directories written by ``--shard i/n`` runs (``out_dir`` may be one of them).
        out_dir: The merged store (created if missing).

    Returns:
        The complete store.

    Raises:
        ManifestMismatchError: Two parts were made with different settings.
        DataError: A part has no manifest, or shards are missing from every part (listed).
    """
    if not parts:
        raise ConfigError("merge_stores: no parts given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part_dirs = [Path(p) for p in parts]
    manifests = [Manifest.load(p) for p in part_dirs]
    reference = manifests[0]
    for directory, manifest in zip(part_dirs[1:], manifests[1:], strict=True):
        try:
            check_compatible(reference.to_dict(), manifest, fields=STORE_FIELDS, where=str(directory))
        except ManifestMismatchError as exc:
            raise ManifestMismatchError(f"{exc} (it is not a part of the same extraction as {part_dirs[0]})") from None
    if (out_dir / MANIFEST_NAME).is_file() and out_dir.resolve() not in {p.resolve() for p in part_dirs}:
        check_compatible(reference.to_dict(), Manifest.load(out_dir), fields=STORE_FIELDS, where=str(out_dir))
    missing = []
    for index in range(reference.n_shards):
        target = shard_path(out_dir, index)
        if target.is_file():
            continue
        source = next((shard_path(p, index) for p in part_dirs if shard_path(p, index).is_file()), None)
        if source is None:
            missing.append(index)
            continue
        _link_or_copy(source, target)
    if not (out_dir / PAIRS_NAME).is_file():
        source = next((p / PAIRS_NAME for p in part_dirs if (p / PAIRS_NAME).is_file()), None)
        if source is not None:
            _link_or_copy(source, out_dir / PAIRS_NAME)
    reference.save(out_dir)
    remove_temporary_files(out_dir)
    if missing:
        shown = ", ".join(shard_path(out_dir, i).name for i in missing[:5])
        raise DataError(
            f"{out_dir}: {len(missing)} of {reference.n_shards} shards are in none of the parts (first: {shown}); "
            "rerun the parts that own them (--shard i/n with the same settings resumes)"
        )
    return VectorStore.open(out_dir)


def merge_jsonl(parts: Sequence[str | Path], out_path: str | Path, key_fields: Sequence[str] = ("id",)) -> int:
    """Concatenate the JSON Lines outputs of several parts, dropping records whose key was already written.

    Lines are copied as they are, one at a time, into a temporary file that replaces ``out_path`` at the end.

    Args:
        parts: Part files, in order.
        out_path: Merged file.
        key_fields: Fields identifying a record (e.g. ``("id", "model", "sample")`` for generations).

    Returns:
        Number of records written.

    Raises:
        DataError: A part is missing or a line is not a JSON object with the key fields (named by file and line).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: part file is missing ({len(missing)} of {len(parts)} missing)")
    seen: set[tuple[str, ...]] = set()
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for part in map(Path, parts):
            with part.open(encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{part} line {line_no}: not valid JSON ({exc.msg})") from exc
                    if not isinstance(record, dict):
                        raise DataError(f"{part} line {line_no}: expected a JSON object")
                    absent = [k for k in key_fields if k not in record]
                    if absent:
                        raise DataError(f"{part} line {line_no} field '{absent[0]}': missing")
                    key = tuple(json.dumps(record[k], sort_keys=True) for k in key_fields)
                    if key not in seen:
                        seen.add(key)
                        out.write(line if line.endswith("\n") else line + "\n")
    return len(seen)


__all__ = [
    "InMemoryPairs",
    "PairSource",
    "ShardSpec",
    "StreamedPairs",
    "as_pair_source",
    "device_for_rank",
    "iter_chunks",
    "merge_jsonl",
    "merge_stores",
    "parse_shard",
    "select_shard",
    "shard_file_name",
    "shard_from_env",
]
