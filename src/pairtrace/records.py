"""Files: the one JSONL reader, and the one atomic writer shared by every stage.

Every file the project writes whole goes through :func:`atomic_path`: the content is written to a temporary file
in the target's folder (``.<name>.<random>.tmp``), flushed to disk, and renamed over the target, so a reader (or a
resumed run) finds the old content or the new one, never half of a file. On an error the temporary file is deleted
and the target is left as it was. Files are created with the mode a plain ``open(path, "w")`` gives
(``0o666`` less the umask), whoever writes them.

:func:`write_text_atomic`, :func:`write_bytes_atomic`, :func:`write_json_atomic` and :func:`write_jsonl_atomic`
cover text, bytes, JSON and JSON Lines (``.gz`` names compressed); writers that take a path (Parquet,
safetensors, NumPy, matplotlib) write to the path :func:`atomic_path` yields. Files that grow record by record
(generations, judgements) are appended to instead, with :func:`append_jsonl`.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pairtrace.errors import DataError

logger = logging.getLogger(__name__)

FILE_MODE = 0o666
"""Mode requested for every file written (the process umask then clears bits, as for a plain ``open``)."""


def _open_text(path: Path, mode: str, compressed: bool) -> IO[str]:
    if compressed:
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return path.open(mode, encoding="utf-8")


def temporary_path(path: str | Path) -> Path:
    """Create an empty temporary file beside ``path`` (same folder, so a rename is atomic) and return its path.

    The name is ``.<name>.<random>.tmp`` (what :func:`pairtrace.store.remove_temporary_files` clears); the file is
    created with :data:`FILE_MODE` less the umask. Most callers want :func:`atomic_path`, which also renames the
    file into place or deletes it; this is for writers that commit later (e.g. a streaming Parquet writer).

    Returns:
        The temporary file's path; the caller renames it over ``path`` (``os.replace``) or deletes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:  # pragma: no cover - a 32-bit random clash
            continue
        os.close(fd)
        return tmp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; rename it over ``path`` when the block ends.

    For writers that take a file name::

        with atomic_path(out / "table.parquet") as tmp:
            pq.write_table(table, tmp)

    The temporary file exists (empty) when the block starts, with the mode of a plain write; a writer that
    replaces it with a file of its own (safetensors creates ``0o600`` files) has that mode put back before the
    rename. A writer that picks a format from the name's extension needs it spelled out
    (e.g. ``savefig(tmp, format="png")``): the temporary name ends in ``.tmp``.

    Args:
        path: The file to (re)place; its folder is created.
        fsync: Flush the new content to disk before the rename (so a crash cannot leave an empty file in place).

    Raises:
        Whatever the block raises: the temporary file is deleted first and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(text: str, path: str | Path, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); newlines are written as given.

    Returns:
        The path written.
    """
    return write_bytes_atomic(text.encode(encoding), path)


def write_jsonl_atomic(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as UTF-8 JSON Lines atomically (see :func:`atomic_path`).

    Records are streamed to the temporary file, so ``records`` may be a generator over more than fits in memory.
    A name ending in ``.gz`` is gzip-compressed.

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as raw:
        if path.name.endswith(".gz"):
            binary: IO[bytes] = gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw)  # type: ignore[assignment]
        else:
            binary = raw
        with io.TextIOWrapper(binary, encoding="utf-8", newline="\n") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_json_atomic(data: Any, path: str | Path, *, indent: int | None = 2) -> Path:
    """Write one JSON document atomically (``default=str`` for paths and other plain values).

    Returns:
        The path written.
    """
    return write_text_atomic(json.dumps(data, indent=indent, ensure_ascii=False, default=str), path)


def append_jsonl(records: Iterable[dict[str, Any]], path: str | Path, *, fsync: bool = True) -> int:
    """Append records as JSON Lines to ``path`` in one write, then flush them to disk.

    For files that grow as work finishes (generations, judgements) and are read back on resume: a killed run
    leaves whole records, at worst one unfinished last line (see :func:`iter_jsonl`'s ``allow_torn_tail``).
    The file is created (mode as for :func:`atomic_path`) when missing.

    Args:
        records: The records; nothing is written (and no file created) when there are none.
        path: The JSONL file (not compressed).
        fsync: Flush to disk before returning.

    Returns:
        The number of records appended.
    """
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    if not lines:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview("".join(lines).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


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
