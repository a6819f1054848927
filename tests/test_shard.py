"""Tests for pairtrace.shard: shard specs, launcher environments, streamed pairs, merging parts."""

from __future__ import annotations

import json

import pytest
import torch

from pairtrace.data.pairs import load_pairs, save_pairs_jsonl
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.shard import (
    ShardSpec,
    StreamedPairs,
    as_pair_source,
    iter_chunks,
    merge_jsonl,
    merge_stores,
    parse_shard,
    select_shard,
    shard_file_name,
    shard_from_env,
)
from pairtrace.store import VectorStore, shard_path
from pairtrace.vectors import compute_datapoint_vectors


def test_parse_shard():
    assert parse_shard("2/4") == ShardSpec(2, 4)
    assert parse_shard(" 0 / 1 ") == ShardSpec() and parse_shard(None).is_whole
    spec = ShardSpec(1, 3)
    assert parse_shard(spec) is spec and str(spec) == "1/3"
    assert spec.units(8) == [1, 4, 7] and spec.owns(4) and not spec.owns(5)
    for bad in ("4/4", "1/0", "-1/2", "1-2", "a/b", ""):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ShardSpec()),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, ShardSpec(3, 8)),  # torchrun / accelerate
        ({"RANK": "0", "WORLD_SIZE": "1", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "6",
          "SLURM_ARRAY_TASK_MIN": "1"}, ShardSpec(4, 6)),  # a SLURM array numbered 1..6
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, ShardSpec(2, 3)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, ShardSpec(1, 2)),  # srun tasks
    ],
)
def test_shard_from_env(env, expected):
    assert shard_from_env(env) == expected


def test_shard_from_env_refuses_garbage():
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        shard_from_env({"WORLD_SIZE": "many", "RANK": "0"})


def test_auto_reads_the_environment(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert parse_shard("auto") == ShardSpec(2, 4)


def test_select_shard_and_file_names():
    items = list(range(10))
    parts = [select_shard(items, ShardSpec(i, 3)) for i in range(3)]
    assert sorted(x for part in parts for x in part) == items
    assert parts[1] == [1, 4, 7]
    assert shard_file_name("generations.jsonl", ShardSpec(1, 4)) == "generations.shard-00001-of-00004.jsonl"
    assert shard_file_name("generations.jsonl", ShardSpec()) == "generations.jsonl"
    assert list(iter_chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_streamed_pairs_read_what_load_pairs_reads(tiny_pairs, tmp_path):
    path = tmp_path / "pairs.jsonl"
    save_pairs_jsonl(tiny_pairs, path, layout="conversational")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:], lines[3]]) + "\n")
    loaded = load_pairs(path)
    stream = StreamedPairs(path)
    assert list(stream.iter_pairs()) == loaded.pairs
    assert stream.n_skipped == len(loaded.skipped) == 2
    assert list(stream.iter_pairs()) == loaded.pairs  # readable again, same pairs
    assert list(StreamedPairs(path, limit=3).iter_pairs()) == load_pairs(path, limit=3).pairs
    with pytest.raises(DataError, match="line 2"):
        list(StreamedPairs(path, strict=True).iter_pairs())
    assert as_pair_source(stream) is stream
    assert list(as_pair_source(loaded).iter_pairs()) == loaded.pairs
    assert list(as_pair_source(loaded.pairs).iter_pairs()) == loaded.pairs
    with pytest.raises(ConfigError, match="pair source"):
        as_pair_source(42)


def test_merge_stores_from_separate_directories(tiny_loaded, tiny_pairs, tmp_path):
    kwargs = {"layers": [1, 3], "shard_size": 3, "progress": False}
    whole = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "whole", **kwargs)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, part, shard=f"{i}/2", **kwargs)
    with pytest.raises(DataError, match=r"1 of 3 shards.*shard-00001"):
        merge_stores(parts[:1], tmp_path / "partial")
    merged = merge_stores(parts, tmp_path / "merged")
    assert merged.complete and merged.ids == whole.ids
    for k in (1, 3):
        assert torch.equal(merged.load(k), whole.load(k))
    assert merged.pair_metadata().equals(whole.pair_metadata())
    assert not list((tmp_path / "merged").glob(".*.tmp"))
    again = merge_stores([tmp_path / "merged"], tmp_path / "merged")  # merging in place: a no-op check
    assert again.complete
    other = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "other", shard="1/2",
                                      **{**kwargs, "layers": [2]})
    assert not other.complete
    with pytest.raises(ManifestMismatchError, match="layers"):
        merge_stores([parts[0], tmp_path / "other"], tmp_path / "mixed")
    with pytest.raises(DataError, match="no manifest"):
        merge_stores([tmp_path / "nothing"], tmp_path / "x")
    assert not shard_path(tmp_path / "mixed", 1).exists()
    assert VectorStore.open(tmp_path / "merged").n == 8


def test_merge_jsonl(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"id": "1", "model": "m0", "sample": 0}\n{"id": "2", "model": "m0", "sample": 0}\n')
    b.write_text('{"id": "2", "model": "m0", "sample": 0}\n\n{"id": "2", "model": "m0", "sample": 1}')
    out = tmp_path / "merged.jsonl"
    assert merge_jsonl([a, b], out, key_fields=("id", "model", "sample")) == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in records] == [("1", 0), ("2", 0), ("2", 1)]
    b.write_text('{"model": "m0"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl line 1 field 'id'"):
        merge_jsonl([a, b], out)
    with pytest.raises(DataError, match="missing"):
        merge_jsonl([a, tmp_path / "c.jsonl"], out)
    assert len(out.read_text().splitlines()) == 3  # a failed merge leaves the previous file alone
