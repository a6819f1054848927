"""Vector shards plus a manifest: atomic writes, compatibility checks, lazy reads.

Layout of a store directory::

    manifest.json                 # Manifest: what produced the vectors (model, layers, template, dataset, ids)
    pairs.parquet                 # one row per vector: id, row, source, chosen_model, rejected_model
    shard-00000.safetensors       # rows [0, shard_size): tensors layer_{k} [rows, d] and n_response_tokens
    shard-00001.safetensors       # rows [shard_size, 2 * shard_size) ...

Shard ``i`` always holds the fixed row range ``[i * shard_size, min(n, (i + 1) * shard_size))`` in input order.
Small stores keep their ids in the manifest; large ones (see ``ids_file``) keep them only in ``pairs.parquet``,
so that the manifest stays small and no reader has to hold every id to open a store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pairtrace import __version__
from pairtrace.data.types import Pair
from pairtrace.errors import DataError, ManifestMismatchError
from pairtrace.pooling import ResponsePooling
from pairtrace.records import atomic_path, temporary_path, write_bytes_atomic

if TYPE_CHECKING:
    from pairtrace.models import LoadedModel

MANIFEST_NAME = "manifest.json"
PAIRS_NAME = "pairs.parquet"
SHARD_PATTERN = "shard-{:05d}.safetensors"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAIR_COLUMNS = ("id", "row", "source", "chosen_model", "rejected_model")
PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("row", pa.int64()),
        ("source", pa.string()),
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
    ]
)


@dataclass
class Manifest:
    """Everything that identifies a vector store's contents (saved as ``manifest.json``)."""

    kind: str = field(metadata={"help": "What the rows are, e.g. 'datapoint'."})
    model: dict[str, Any] = field(metadata={"help": "Model identity (name, revision, weights_hash, template)."})
    layers: list[int] = field(metadata={"help": "Layers stored, as hidden_states indices."})
    template: dict[str, Any] = field(metadata={"help": "Prompt formatting: {'mode': chat|plain, 'hash': ...}."})
    dataset: dict[str, Any] = field(metadata={"help": "{'origin', 'fingerprint', 'n_pairs'} of the input pairs."})
    ids: list[str] = field(
        metadata={"help": "Stable ids of the rows, in row order (empty when they live in ``ids_file``)."}
    )
    shard_size: int = field(metadata={"help": "Rows per shard (the last shard may be shorter)."})
    dtype: str = field(metadata={"help": "Storage dtype of the vectors: float32, bfloat16 or float16."})
    n_shards: int = field(metadata={"help": "Number of shards of a complete store."})
    hidden_size: int = field(default=0, metadata={"help": "Width d of each vector."})
    settings: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extraction settings that change the vectors (e.g. max_length)."}
    )
    n_rows: int | None = field(
        default=None, metadata={"help": "Number of rows when the ids live in ``ids_file`` (else len(ids))."}
    )
    ids_file: str | None = field(
        default=None, metadata={"help": "Parquet file in the store (column 'id') holding the ids of a large store."}
    )
    truncation: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Sequence lengths: the requested and effective max_length, the model's max_positions, and "
                  "n_truncated_pairs (pairs whose prompt or response was cut; set when the store is complete)."},
    )
    extraction: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "How the vectors were computed (batching, prompt sharing...): speed, not values; "
                  "never compared on resume."},
    )
    pairtrace_version: str = field(default=__version__, metadata={"help": "Version that wrote the store."})
    created: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"),
        metadata={"help": "UTC creation time (ISO 8601)."},
    )

    @property
    def n(self) -> int:
        """Number of rows."""
        if self.ids_file is not None:
            return int(self.n_rows or 0)
        return len(self.ids)

    @property
    def pooling(self) -> ResponsePooling:
        """How the response means were pooled (recorded in :attr:`settings`; absent: every response token)."""
        return ResponsePooling.from_settings(self.settings)

    @property
    def response_tokens(self) -> int | None:
        """Tokens pooled per response mean (``None``: every response token; stores made before the option)."""
        return self.pooling.response_tokens

    def shard_range(self, index: int) -> tuple[int, int]:
        """Row range ``[start, end)`` of shard ``index``."""
        start = index * self.shard_size
        return start, min(self.n, start + self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from :meth:`to_dict` output, ignoring unknown keys (newer writers)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        missing = [
            k
            for k, f in cls.__dataclass_fields__.items()
            if k not in known and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise DataError(f"manifest is missing field(s) {missing}")
        return cls(**known)

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` in ``directory`` atomically."""
        path = Path(directory) / MANIFEST_NAME
        write_bytes_atomic(json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode(), path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read ``manifest.json`` from ``directory``."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"{path}: no manifest (not a vector store, or its extraction never started)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: manifest must be a JSON object")
        try:
            return cls.from_dict(data)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc


def shard_path(directory: str | Path, index: int) -> Path:
    """Path of shard ``index`` in a store directory."""
    return Path(directory) / SHARD_PATTERN.format(index)


def write_shard(directory: str | Path, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Save one shard atomically (temporary file + ``os.replace``), so a shard file is either whole or absent.

    Args:
        directory: Store directory.
        index: Shard index.
        tensors: ``layer_{k}`` tensors ``[rows, d]`` and ``n_response_tokens``.

    Returns:
        The shard's path.
    """
    path = shard_path(directory, index)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return path


TRUNCATED_KEY = "truncated"
"""Shard tensor ``[rows]`` (uint8): 1 where the pair's prompt or a response was cut to fit ``max_length``."""


def shard_problem(path: str | Path) -> str | None:
    """What is wrong with a shard file, or None when it is whole.

    Reads only the safetensors header: the file must hold its 8-byte header length, a JSON header, and exactly
    the data bytes the header's offsets cover (a copy or a disk that ran out cuts a file short).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            if size < 8:
                return f"cut short ({size} bytes)"
            header_len = int.from_bytes(fh.read(8), "little")
            if 8 + header_len > size:
                return f"cut short ({size} bytes, the header alone needs {8 + header_len})"
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"cut short ({size} of {expected} bytes)"
    if size > expected:
        return f"{size - expected} bytes longer than its header says"
    return None


def remove_temporary_files(directory: str | Path) -> None:
    """Delete temporary files that an interrupted writer left in a store directory."""
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


class PairMetadataWriter:
    """Stream one ``(id, row, source, chosen_model, rejected_model)`` row per pair into a Parquet file.

    Rows are buffered and written a row group at a time into a temporary file in the target directory, so memory
    stays flat in the number of pairs; :meth:`commit` moves the finished file into place atomically and
    :meth:`discard` deletes it. Used as a context manager, an exception discards the file.

    Args:
        path: Final path (usually ``<store>/pairs.parquet``).
        rows_per_group: Rows buffered per Parquet row group.
    """

    def __init__(self, path: str | Path, rows_per_group: int = 4096) -> None:
        self.path = Path(path)
        self.rows_per_group = rows_per_group
        self.tmp = temporary_path(self.path)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(str(self.tmp), PAIR_SCHEMA)
        self._buffer: dict[str, list[Any]] = {name: [] for name in PAIR_COLUMNS}
        self.n = 0

    def add(self, pair: Pair) -> None:
        """Append one pair's metadata row."""
        for name in PAIR_COLUMNS:
            self._buffer[name].append(getattr(pair, name))
        self.n += 1
        if len(self._buffer["id"]) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer["id"] and self._writer is not None:
            self._writer.write_table(pa.Table.from_pydict(self._buffer, schema=PAIR_SCHEMA))
            self._buffer = {name: [] for name in PAIR_COLUMNS}

    def _close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def commit(self) -> Path:
        """Finish the file and move it to :attr:`path` (replacing any previous file)."""
        self._close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Close and delete the temporary file."""
        try:
            self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> PairMetadataWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._writer is not None:
            self.discard()


def read_pair_metadata(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a pair-metadata Parquet file (``pairs.parquet``) into a frame in row order.

    Args:
        path: The file.
        columns: Columns to read (default: all of :data:`PAIR_COLUMNS`).

    Raises:
        DataError: The file is missing or lacks a requested column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pair metadata file is missing")
    wanted = list(columns or PAIR_COLUMNS)
    names = pq.read_schema(path).names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{path}: pair metadata has no column(s) {missing}")
    frame = pq.read_table(path, columns=wanted).to_pandas()
    for name in wanted:
        if name != "row":  # missing strings read as None (as in a frame built from pairs), never NaN
            frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    return frame


def _describe(field_name: str, value: Any) -> str:
    if field_name == "model" and isinstance(value, dict):
        return f"{value.get('name')} (revision {value.get('revision')}, weights {value.get('weights_hash')})"
    if field_name == "dataset" and isinstance(value, dict):
        return f"{value.get('origin')} (fingerprint {value.get('fingerprint')}, {value.get('n_pairs')} pairs)"
    if field_name == "template" and isinstance(value, dict):
        return f"{value.get('mode')} (hash {value.get('hash')})"
    if field_name == "ids" and isinstance(value, list):
        return f"{len(value)} ids"
    return repr(value)


def _comparable(field_name: str, value: Any) -> Any:
    """The part of a field that must match."""
    if field_name == "model" and isinstance(value, dict):
        if value.get("weights_hash"):
            return value["weights_hash"]
        return (value.get("name"), value.get("revision"))
    if field_name == "template" and isinstance(value, dict):
        return (value.get("mode"), value.get("hash"))
    if field_name == "dataset" and isinstance(value, dict):
        return (value.get("fingerprint"), value.get("n_pairs"))
    if field_name == "layers" and value is not None:
        return sorted(value)
    return value


def build_expected(loaded: LoadedModel, layers: Sequence[int]) -> dict[str, Any]:
    """The ``model``/``layers``/``template`` values that :func:`check_compatible` compares."""
    return {
        "model": dict(loaded.identity),
        "layers": list(layers),
        "template": {"mode": loaded.template_mode, "hash": loaded.identity["template_hash"]},
    }


def pooling_settings(max_length: int, pooling: ResponsePooling) -> dict[str, Any]:
    """The manifest ``settings`` of a datapoint store (or behaviour vectors): ``max_length`` and the pooling's
    entries (:meth:`pairtrace.pooling.ResponsePooling.to_settings`)."""
    return {"max_length": max_length, **pooling.to_settings()}


def check_compatible(
    expected: dict[str, Any],
    found: Manifest,
    fields: Sequence[str] = ("model", "layers", "template", "dataset"),
    where: str = "",
) -> None:
    """Refuse a manifest that was produced under other settings.

    Fields compared: ``model`` by weights hash (name and revision if no hash), ``layers`` as sorted lists,
    ``template`` by mode and hash, ``dataset`` by fingerprint and size; any other manifest attribute (``ids``,
    ``shard_size``, ``dtype``, ``settings``, ...) by equality.

    Args:
        expected: Values in the manifest's own shape (``{"model": identity, "layers": [...], "template":
            {"mode", "hash"}, "dataset": {...}}``); behaviour-vector metadata has this shape too.
        found: The manifest to check.
        fields: Which fields to compare; each must be present in ``expected``.
        where: Name of the checked artifact, for the message.

    Raises:
        ManifestMismatchError: Names every differing field with both values.
        KeyError: A requested field is missing from ``expected``.
    """
    problems = []
    for name in fields:
        if name not in expected:
            raise KeyError(f"check_compatible: expected values have no field {name!r}")
        want, have = expected[name], getattr(found, name)
        if _comparable(name, want) != _comparable(name, have):
            problems.append(f"{name}: expected {_describe(name, want)}, found {_describe(name, have)}")
    if problems:
        prefix = f"{where}: " if where else ""
        raise ManifestMismatchError(f"{prefix}artifact was produced under different settings; " + "; ".join(problems))


class VectorStore:
    """Read access to a directory of vector shards described by a manifest."""

    def __init__(self, directory: Path, manifest: Manifest, present: list[bool]) -> None:
        self.directory = directory
        self.manifest = manifest
        self._present = present
        self._ids: list[str] | None = None

    @classmethod
    def open(cls, directory: str | Path, allow_incomplete: bool = False) -> VectorStore:
        """Open a store directory.

        Args:
            directory: The store directory.
            allow_incomplete: Open even if some shards are missing; their rows read as NaN and are invalid.

        Raises:
            DataError: No manifest, or missing shards while ``allow_incomplete`` is false.
        """
        directory = Path(directory)
        manifest = Manifest.load(directory)
        if manifest.ids_file is not None and not (directory / manifest.ids_file).is_file():
            raise DataError(f"{directory}: manifest field 'ids_file' names {manifest.ids_file}, which is missing")
        present = [shard_path(directory, i).is_file() for i in range(manifest.n_shards)]
        for index, ok in enumerate(present):
            problem = shard_problem(shard_path(directory, index)) if ok else None
            if problem is None:
                continue
            if not allow_incomplete:
                raise DataError(
                    f"{shard_path(directory, index)}: damaged shard, {problem}; rerun the `pairtrace vectors` command "
                    "that wrote this store, with the same settings: it computes the shard again"
                )
            present[index] = False  # read as missing: NaN rows, counted invalid
        if not all(present) and not allow_incomplete:
            missing = [i for i, ok in enumerate(present) if not ok]
            raise DataError(
                f"{directory}: vector store is incomplete ({len(missing)} of {manifest.n_shards} shards missing, "
                f"first: {shard_path(directory, missing[0]).name}); rerun the `pairtrace vectors` command that wrote "
                "it, with the same settings, to finish it"
            )
        return cls(directory, manifest, present)

    def n_truncated_pairs(self) -> int | None:
        """Pairs whose prompt or a response was cut to fit ``max_length`` (None when a shard does not say:
        missing, or written before shards recorded it)."""
        total = 0
        for index in range(self.manifest.n_shards):
            if not self._present[index]:
                return None
            with safe_open(str(shard_path(self.directory, index)), framework="pt") as fh:
                keys = list(fh.keys())
                if TRUNCATED_KEY not in keys:
                    return None
                total += int(fh.get_tensor(TRUNCATED_KEY).sum())
        return total

    @property
    def complete(self) -> bool:
        """Whether every shard is present."""
        return all(self._present)

    @property
    def ids(self) -> list[str]:
        """Row ids, in row order (read once from ``ids_file`` for large stores)."""
        if self.manifest.ids_file is None:
            return self.manifest.ids
        if self._ids is None:
            path = self.directory / self.manifest.ids_file
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
            if len(ids) != self.n:
                raise DataError(f"{path}: holds {len(ids)} ids, but the manifest has {self.n} rows")
            self._ids = ids
        return self._ids

    def pair_metadata(self) -> pd.DataFrame | None:
        """The pairs' ``id``, ``row``, ``source``, ``chosen_model``, ``rejected_model`` in row order.

        Returns:
            A frame with one row per vector, or ``None`` for a store written without ``pairs.parquet``.
        """
        path = self.directory / PAIRS_NAME
        if not path.is_file():
            return None
        frame = read_pair_metadata(path)
        if len(frame) != self.n:
            raise DataError(f"{path}: holds {len(frame)} pairs, but the store has {self.n} rows")
        return frame

    def is_present(self, index: int) -> bool:
        """Whether shard ``index`` is on disk."""
        return self._present[index]

    @property
    def layers(self) -> list[int]:
        """Stored layers."""
        return self.manifest.layers

    @property
    def n(self) -> int:
        """Number of rows."""
        return self.manifest.n

    @property
    def hidden_size(self) -> int:
        """Vector width d."""
        return self.manifest.hidden_size

    def _key(self, layer: int) -> str:
        if layer not in self.manifest.layers:
            raise DataError(f"{self.directory}: layer {layer} is not stored (stored layers: {self.manifest.layers})")
        return f"layer_{layer}"

    def _read_rows(self, key: str, start: int, end: int, width: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``[start, end)`` of tensor ``key`` across shards, NaN (or 0 for counts) for missing shards."""
        parts = []
        size = self.manifest.shard_size
        for index in range(start // size, (end - 1) // size + 1):
            s0, s1 = self.manifest.shard_range(index)
            a, b = max(start, s0) - s0, min(end, s1) - s0
            if self._present[index]:
                with safe_open(str(shard_path(self.directory, index)), framework="pt") as fh:
                    parts.append(fh.get_slice(key)[a:b].to(dtype))
            else:
                shape = (b - a,) if width is None else (b - a, width)
                fill = float("nan") if dtype.is_floating_point else 0
                parts.append(torch.full(shape, fill, dtype=dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def read_rows(self, layer: int, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[start, end)`` of one layer, ``[end - start, d]``, reading only the shards they lie in.

        Rows of missing shards read as NaN.
        """
        if not 0 <= start <= end <= self.n:
            raise DataError(f"{self.directory}: rows [{start}, {end}) are outside the store's {self.n} rows")
        if start == end:
            return torch.empty(0, self.hidden_size, dtype=dtype)
        return self._read_rows(self._key(layer), start, end, self.hidden_size, dtype)

    def iter_chunks(
        self, layer: int, rows: int = 65536, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream one layer in chunks, reading only the shards each chunk needs.

        Args:
            layer: A stored layer.
            rows: Rows per chunk (the last chunk may be shorter).
            dtype: Dtype of the yielded tensors.

        Yields:
            ``(start, tensor [rows, d])`` with ``start`` the first row's index.
        """
        key = self._key(layer)
        for start in range(0, self.n, rows):
            yield start, self._read_rows(key, start, min(self.n, start + rows), self.hidden_size, dtype)

    def load(self, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows of one layer: tensor ``[n, d]``."""
        key = self._key(layer)
        if self.n == 0:
            return torch.empty(0, self.hidden_size, dtype=dtype)
        return self._read_rows(key, 0, self.n, self.hidden_size, dtype)

    def n_response_tokens(self) -> torch.Tensor:
        """Response token counts per row as stored (datapoint stores: ``[n, 2]`` chosen, rejected)."""
        if self.n == 0:
            return torch.empty(0, 2, dtype=torch.long)
        index = next((i for i, ok in enumerate(self._present) if ok), None)
        if index is None:
            return torch.zeros(self.n, 2, dtype=torch.long)
        with safe_open(str(shard_path(self.directory, index)), framework="pt") as fh:
            width = fh.get_slice("n_response_tokens").get_shape()[1:]
        return self._read_rows("n_response_tokens", 0, self.n, width[0] if width else None, torch.long)

    def valid_mask(self) -> torch.Tensor:
        """Bool ``[n]``: rows whose vectors are finite at every stored layer (missing shards are invalid)."""
        mask = torch.ones(self.n, dtype=torch.bool)
        for layer in self.layers:
            for start, chunk in self.iter_chunks(layer):
                mask[start : start + chunk.shape[0]] &= torch.isfinite(chunk).all(dim=1)
        return mask
