"""The shared JSON / JSON Lines reader and atomic writers."""

from __future__ import annotations

import gzip
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from pairtrace.errors import DataError
from pairtrace.records import (
    append_jsonl,
    atomic_path,
    read_jsonl,
    temporary_path,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


@pytest.mark.parametrize("name", ["records.jsonl", "records.jsonl.gz"])
def test_jsonl_round_trip_plain_and_gzip(tmp_path: Path, name: str) -> None:
    records = [{"id": i, "text": "héllo"} for i in range(3)]
    path = write_jsonl_atomic(iter(records), tmp_path / "sub" / name)
    assert read_jsonl(path) == records
    if name.endswith(".gz"):
        assert gzip.decompress(path.read_bytes()).decode().count("\n") == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_line_is_named_and_a_torn_tail_can_be_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ', encoding="utf-8")
    with pytest.raises(DataError, match="line 4: not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(path, allow_torn_tail=True) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_json_writer_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "result.json"
    write_json_atomic({"path": tmp_path, "x": [1, 2]}, path)
    write_json_atomic({"x": 3}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 3}
    assert not list(tmp_path.rglob("*.tmp"))


def test_field_check_names_the_record_the_id_and_the_field() -> None:
    from pairtrace.records import check_record_fields

    fields = {"id": str, "sample": int}
    assert check_record_fields({"id": "a", "sample": 0}, fields, "record 1") == {"id": "a", "sample": 0}
    with pytest.raises(DataError, match=r"record 2 \(id='a'\): field 'sample' is missing"):
        check_record_fields({"id": "a"}, fields, "record 2")
    with pytest.raises(DataError, match="field 'sample' must be int"):
        check_record_fields({"id": "a", "sample": True}, fields, "record 3")
    with pytest.raises(DataError, match="record 4: expected a JSON object, got list"):
        check_record_fields([1], fields, "record 4")


class Boom(RuntimeError):
    """Raised in the middle of a write."""


def _records_then_boom() -> Iterator[dict]:
    yield {"id": 1}
    yield {"id": 2}
    raise Boom("interrupted")


class _Unserialisable:
    def __str__(self) -> str:
        raise Boom("interrupted")


def _atomic_path_then_boom(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("half of the new", encoding="utf-8")
        raise Boom("interrupted")


FAILING_WRITES: dict[str, Callable[[Path], object]] = {
    "jsonl": lambda path: write_jsonl_atomic(_records_then_boom(), path),
    "jsonl.gz": lambda path: write_jsonl_atomic(_records_then_boom(), path.with_name(path.name + ".gz")),
    "json": lambda path: write_json_atomic({"x": _Unserialisable()}, path),
    "text": lambda path: write_text_atomic("ok \udcff", path),  # a lone surrogate cannot be encoded
    "bytes": lambda path: write_bytes_atomic(_Unserialisable(), path),  # type: ignore[arg-type]
    "atomic_path": _atomic_path_then_boom,
}


@pytest.mark.parametrize("kind", sorted(FAILING_WRITES))
def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "out.jsonl"
    target = path.with_name(path.name + ".gz") if kind == "jsonl.gz" else path
    target.write_bytes(b"old\n")
    with pytest.raises((Boom, TypeError, UnicodeEncodeError)):
        FAILING_WRITES[kind](path)
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left
    fresh = tmp_path / "new" / "out.jsonl"
    with pytest.raises((Boom, TypeError, UnicodeEncodeError)):
        FAILING_WRITES[kind](fresh)
    assert not fresh.parent.exists() or not any(fresh.parent.iterdir())  # nothing where there was nothing


def _plain_mode(tmp_path: Path) -> int:
    with (tmp_path / "plain").open("w") as fh:
        fh.write("x")
    return stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def _parquet(folder: Path) -> Path:
    with atomic_path(folder / "f.parquet") as tmp:
        pq.write_table(pa.table({"a": [1, 2]}), tmp)
    return folder / "f.parquet"


def _safetensors(folder: Path) -> Path:
    with atomic_path(folder / "g.safetensors") as tmp:
        save_file({"t": torch.zeros(2)}, str(tmp))
    return folder / "g.safetensors"


def _npy(folder: Path) -> Path:
    with atomic_path(folder / "h.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, np.arange(3))
    return folder / "h.npy"


_WHOLE_FILE_WRITERS: list[Callable[[Path], Path]] = [
    lambda folder: write_text_atomic("text\n", folder / "a.txt"),
    lambda folder: write_bytes_atomic(b"\x00\x01", folder / "b.bin"),
    lambda folder: write_json_atomic({"a": 1}, folder / "c.json"),
    lambda folder: write_jsonl_atomic([{"a": 1}], folder / "d.jsonl"),
    lambda folder: write_jsonl_atomic([{"a": 1}], folder / "e.jsonl.gz"),
    _parquet,
    _safetensors,
    _npy,
]


def _written_by_every_writer(folder: Path) -> list[Path]:
    paths = [write(folder) for write in _WHOLE_FILE_WRITERS]
    append_jsonl([{"a": 1}], folder / "i.jsonl")
    return [*paths, folder / "i.jsonl"]


def test_a_failure_after_the_content_is_written_leaves_the_old_files(tmp_path: Path, monkeypatch) -> None:
    import pairtrace.records as records

    folder = tmp_path / "out"
    first = _written_by_every_writer(folder)
    before = {p.name: p.read_bytes() for p in first}

    def disk_failure(path: Path) -> None:
        assert path.stat().st_size > 0  # the new content is all there, only the sync fails
        raise OSError("no space left on device")

    monkeypatch.setattr(records, "_fsync_file", disk_failure)
    for write in _WHOLE_FILE_WRITERS:
        with pytest.raises(OSError, match="no space"):
            write(folder)
    assert {p.name: p.read_bytes() for p in first} == before
    assert not list(folder.glob(".*"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_writer_gives_the_mode_of_a_plain_write(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        expected = _plain_mode(tmp_path)
        paths = _written_by_every_writer(tmp_path / "out")
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths} == {p.name: expected for p in paths}
    assert read_jsonl(tmp_path / "out" / "e.jsonl.gz") == [{"a": 1}]
    assert np.load(tmp_path / "out" / "h.npy").tolist() == [0, 1, 2]
    assert not list((tmp_path / "out").glob(".*"))


def test_temporary_path_is_a_fresh_hidden_sibling(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.parquet"
    first, second = temporary_path(target), temporary_path(target)
    assert first != second and first.parent == second.parent == target.parent
    assert first.name.startswith(".x.parquet.") and first.name.endswith(".tmp")
    assert first.stat().st_size == 0 and not target.exists()


def test_append_jsonl_appends_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gens.jsonl"
    assert append_jsonl([], path) == 0 and not path.exists()
    assert append_jsonl([{"id": 1}], path) == 1
    assert append_jsonl(({"id": i, "t": "é"} for i in (2, 3)), path) == 2
    assert read_jsonl(path) == [{"id": 1}, {"id": 2, "t": "é"}, {"id": 3, "t": "é"}]
