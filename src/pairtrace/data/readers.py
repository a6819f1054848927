"""Raw records of a preference dataset, wherever they are stored: JSON Lines (gzip too), a JSON array, Parquet, a
saved ``datasets`` folder or a hub dataset (:func:`iter_records`); a record that cannot be decoded is reported, not
dropped."""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairtrace.data.types import BadRecord
from pairtrace.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("jsonl", "json", "parquet", "disk", "hub")
"""Kinds of input :func:`iter_records` reads (see :func:`detect_source_kind`)."""


_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json.gz")
_DATA_SUFFIXES = (*_JSONL_SUFFIXES, ".json", ".parquet", ".pq", ".csv", ".arrow")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_BATCH_ROWS = 1024


def type_name(value: Any) -> str:
    """JSON-ish name of a value's type, for messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class RawRecord:
    """One record as stored in the input, before it is interpreted as a pair.

    Attributes:
        row: Zero-based record index (blank JSONL lines are not records and are not counted).
        line: One-based line number for JSON Lines inputs, else ``None``.
        data: The decoded record, or ``None`` when it could not be decoded.
        bad: Why the record could not be decoded (unparsable line, invalid UTF-8, not an object), else ``None``.
    """

    row: int = field(metadata={"help": "zero-based record index"})
    line: int | None = field(metadata={"help": "one-based line number (JSON Lines only)"})
    data: dict[str, Any] | None = field(default=None, metadata={"help": "decoded record"})
    bad: BadRecord | None = field(default=None, metadata={"help": "decoding failure, if any"})


def detect_source_kind(source: str | os.PathLike) -> str:
    """Tell what kind of input ``source`` is.

    Args:
        source: A file, a folder written by ``datasets.Dataset.save_to_disk``, or a hub dataset id.

    Returns:
        One of ``"jsonl"`` (also ``.jsonl.gz``), ``"json"`` (a JSON array file), ``"parquet"``, ``"disk"``
        (a saved ``datasets`` folder) or ``"hub"``.

    Raises:
        DataError: If the path does not exist and is not a hub id, or its type is not supported.
    """
    path = Path(source)
    name = path.name.lower()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk"
        raise DataError(f"{path}: folder is not a dataset saved with datasets' save_to_disk")
    if path.is_file():
        if name.endswith(_JSONL_SUFFIXES):
            return "jsonl"
        if name.endswith(".json"):
            return "json" if _first_char(path) == "[" else "jsonl"
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        raise DataError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json or .parquet)")
    text = str(source)
    if not name.endswith(_DATA_SUFFIXES) and _HUB_ID.match(text):
        return "hub"
    raise DataError(f"{text}: no such file or folder")


def _first_char(path: Path) -> str:
    """First non-whitespace character of a text file (empty string for an empty file)."""
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    return head[:1].decode("ascii", errors="replace")


def iter_records(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> Iterator[RawRecord]:
    """Stream the raw records of an input, one at a time, with their row and line.

    Memory stays flat for JSON Lines, Parquet and saved ``datasets`` folders; a JSON array file is read whole.

    Args:
        source: JSONL (``.jsonl``, ``.jsonl.gz``), JSON array, Parquet, a ``save_to_disk`` folder, or a hub id.
        split: Split to read from a dataset with several splits (default: the only split, else ``"train"``).
        revision: Hub revision (commit, tag or branch); strongly recommended for hub ids.
        limit: Stop after this many records.

    Yields:
        :class:`RawRecord` objects in input order. Records that cannot be decoded carry a ``bad`` record.

    Raises:
        DataError: If the input as a whole cannot be read.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be a number of records (0 or more), got {limit!r}")
    kind = detect_source_kind(source)
    if kind == "jsonl":
        records = _iter_jsonl(Path(source))
    elif kind == "json":
        records = _iter_json_array(Path(source))
    elif kind == "parquet":
        records = _iter_parquet(Path(source))
    elif kind == "disk":
        records = _iter_dataset(_load_disk_dataset(Path(source), split))
    else:
        records = _iter_dataset(_load_hub_dataset(str(source), split, revision))
    for count, record in enumerate(records):
        if limit is not None and count >= limit:
            break
        yield record


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    """Records of a JSON Lines file (gzip-compressed when the name ends with ``.gz``)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    row = 0
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                if line_no == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue  # blank lines separate nothing and are not records
                yield _decode_jsonl_line(raw, row, line_no)
                row += 1
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read file after {row} records: {exc}") from exc


def _decode_jsonl_line(raw: bytes, row: int, line_no: int) -> RawRecord:
    """Decode one JSON Lines line into a :class:`RawRecord`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(row, line_no, bad=BadRecord(row, line_no, None, f"invalid UTF-8 at byte {exc.start}"))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} (column {exc.colno})"
        return RawRecord(row, line_no, bad=BadRecord(row, line_no, None, reason))
    if not isinstance(data, dict):
        reason = f"expected a JSON object, got {type_name(data)}"
        return RawRecord(row, line_no, bad=BadRecord(row, line_no, None, reason))
    return RawRecord(row, line_no, data=data)


def _iter_json_array(path: Path) -> Iterator[RawRecord]:
    """Records of a file holding one JSON array of objects."""
    try:
        data = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type_name(data)}")
    for row, item in enumerate(data):
        if isinstance(item, dict):
            yield RawRecord(row, None, data=item)
        else:
            yield RawRecord(row, None, bad=BadRecord(row, None, None, f"expected an object, got {type_name(item)}"))


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    """Records of a Parquet file, read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            for item in batch.to_pylist():
                yield RawRecord(row, None, data=item)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from exc


def _load_disk_dataset(path: Path, split: str | None) -> Any:
    """Open a folder written by ``save_to_disk`` and pick the split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot open saved dataset: {exc}") from exc
    return _select_split(loaded, split, str(path))


def _load_hub_dataset(dataset_id: str, split: str | None, revision: str | None) -> Any:
    """Load a hub dataset (``datasets.load_dataset``) and pick the split."""
    import datasets

    if revision is None:
        message = (
            f"loading hub dataset '{dataset_id}' without a revision: results will not be reproducible "
            "(pass revision= a commit hash or tag)"
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    try:
        loaded = datasets.load_dataset(dataset_id, revision=revision, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise DataError(f"{dataset_id}: cannot load hub dataset (revision {revision}): {exc}") from exc
    return _select_split(loaded, split, dataset_id)


def _select_split(loaded: Any, split: str | None, origin: str) -> Any:
    """Return one ``Dataset`` from a ``Dataset`` or ``DatasetDict``."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded.keys())
        if split is not None:
            if split not in loaded:
                raise DataError(f"{origin}: no split '{split}' (available: {', '.join(names)})")
            return loaded[split]
        if len(names) == 1:
            return loaded[names[0]]
        if "train" in loaded:
            return loaded["train"]
        raise DataError(f"{origin}: several splits ({', '.join(names)}): pass split=")
    if split is not None and loaded.split is not None and str(loaded.split) != split:
        raise DataError(f"{origin}: holds split '{loaded.split}', not '{split}'")
    return loaded


def _iter_dataset(dataset: Any) -> Iterator[RawRecord]:
    """Records of a ``datasets.Dataset``, read as Arrow batches."""
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for item in table.to_pylist():
            yield RawRecord(row, None, data=item)
            row += 1
