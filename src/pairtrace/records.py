"""JSON and JSON Lines files: the one reader and the atomic writers shared by every stage.

Writers go through a temporary file renamed over the target, so a reader (or a resumed run) finds the old content
or the new one, never half of a file. ``.gz`` names are compressed.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pairtrace.errors import DataError

logger = logging.getLogger(__name__)


def _open_text(path: Path, mode: str, compressed: bool) -> IO[str]:
    if compressed:
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return path.open(mode, encoding="utf-8")


def write_jsonl_atomic(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as UTF-8 JSON Lines to a temporary file, then rename it over ``path``.

    A reader never sees a half-written file: it finds the old content or the new one. A name ending in ``.gz``
    is gzip-compressed.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _open_text(tmp, "w", compressed=path.name.endswith(".gz")) as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_json_atomic(data: Any, path: str | Path, *, indent: int | None = 2) -> Path:
    """Write one JSON document atomically (``default=str`` for paths and other plain values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def iter_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` for each JSON object of a JSONL file (``.gz`` too); blank lines skipped.

    Args:
        path: The file.
        allow_torn_tail: Skip (with a warning) a last line that has no newline and does not parse:
            what an interrupted writer leaves behind.

    Raises:
        DataError: The file is missing, or a line is not a JSON object (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _open_text(path, "r", compressed=path.name.endswith(".gz")) as fh:
        for number, line in enumerate(fh, start=1):  # streamed: memory does not grow with the file
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if allow_torn_tail and not line.endswith("\n"):  # only the last line can lack its newline
                    logger.warning("%s: ignoring unfinished last line %d", path, number)
                    continue
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file (``.gz`` too) of objects: :func:`iter_jsonl` without the line numbers.

    Returns:
        The records, in file order (blank lines skipped).

    Raises:
        DataError: The file is missing, or a line is not a JSON object (the message names the line).
    """
    return [record for _, record in iter_jsonl(path, allow_torn_tail=allow_torn_tail)]


def check_record_fields(record: Any, fields: dict[str, type], where: str) -> dict[str, Any]:
    """Check that ``record`` is an object whose ``fields`` are present with the given types.

    ``bool`` never passes for ``int``. ``where`` names the record in the message (e.g. "generation record 3").

    Returns:
        The record.

    Raises:
        DataError: Naming the record (and its ``id`` when it has one) and the first bad field.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, kind in fields.items():
        value = record.get(name)
        if value is None:
            raise DataError(f"{where} (id={record.get('id')!r}): field '{name}' is missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{where} (id={record.get('id')!r}): field '{name}' must be {kind.__name__}")
    return record
