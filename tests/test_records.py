"""The shared JSON / JSON Lines reader and atomic writers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pairtrace.errors import DataError
from pairtrace.records import read_jsonl, write_json_atomic, write_jsonl_atomic


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
