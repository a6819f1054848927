"""Tests for pairtrace.store: manifest, atomic shards, lazy reads, compatibility checks."""

from __future__ import annotations

import json

import pytest
import torch

from pairtrace.errors import DataError, ManifestMismatchError
from pairtrace.store import (
    MANIFEST_NAME,
    Manifest,
    VectorStore,
    check_compatible,
    remove_temporary_files,
    shard_path,
    write_shard,
)

MODEL = {"name": "/models/m0", "revision": None, "weights_hash": "sha256:aaa", "template_mode": "chat"}


def _manifest(n: int = 10, shard_size: int = 4, layers=(1, 3), d: int = 5, **changes) -> Manifest:
    values = {
        "kind": "datapoint",
        "model": dict(MODEL),
        "layers": list(layers),
        "template": {"mode": "chat", "hash": "sha256:ttt"},
        "dataset": {"origin": "pairs.jsonl", "fingerprint": "fff", "n_pairs": n},
        "ids": [f"id-{i}" for i in range(n)],
        "shard_size": shard_size,
        "dtype": "float32",
        "n_shards": (n + shard_size - 1) // shard_size,
        "hidden_size": d,
        "settings": {"max_length": 2048},
    }
    values.update(changes)
    return Manifest(**values)


def _write_store(directory, manifest: Manifest, data: dict[int, torch.Tensor], skip=()):
    manifest.save(directory)
    for index in range(manifest.n_shards):
        if index in skip:
            continue
        start, end = manifest.shard_range(index)
        tensors = {f"layer_{k}": data[k][start:end] for k in manifest.layers}
        tensors["n_response_tokens"] = torch.arange(start, end).repeat_interleave(2).reshape(-1, 2)
        write_shard(directory, index, tensors)


@pytest.fixture
def data() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(10, 5, generator=gen) for k in (1, 3)}


def test_manifest_round_trip(tmp_path):
    manifest = _manifest()
    path = manifest.save(tmp_path)
    assert path.name == MANIFEST_NAME
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert loaded.n == 10 and loaded.shard_range(2) == (8, 10)
    assert json.loads(path.read_text())["pairtrace_version"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves nothing behind


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        Manifest.load(tmp_path)
    partial = _manifest().to_dict()
    del partial["ids"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(partial))
    with pytest.raises(DataError, match="ids"):
        Manifest.load(tmp_path)


def test_store_round_trip_and_chunks(tmp_path, data):
    manifest = _manifest()
    _write_store(tmp_path, manifest, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        MANIFEST_NAME,
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    store = VectorStore.open(tmp_path)
    assert store.complete and store.n == 10 and store.hidden_size == 5
    assert store.layers == [1, 3] and store.ids == manifest.ids
    for k in (1, 3):
        assert torch.equal(store.load(k), data[k])
        chunks = list(store.iter_chunks(k, rows=3))  # chunks straddle shard boundaries
        assert [start for start, _ in chunks] == [0, 3, 6, 9]
        assert torch.equal(torch.cat([c for _, c in chunks]), data[k])
    assert store.n_response_tokens()[:, 0].tolist() == list(range(10))
    assert store.valid_mask().all()
    with pytest.raises(DataError, match="layer 2 is not stored"):
        store.load(2)


def test_store_bfloat16_reads_as_float32(tmp_path, data):
    manifest = _manifest(dtype="bfloat16")
    _write_store(tmp_path, manifest, {k: v.to(torch.bfloat16) for k, v in data.items()})
    loaded = VectorStore.open(tmp_path).load(1)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, data[1].to(torch.bfloat16).float())


def test_valid_mask_flags_nonfinite_rows(tmp_path, data):
    data[3][7, 2] = float("nan")
    data[1][2, 0] = float("inf")
    _write_store(tmp_path, _manifest(), data)
    mask = VectorStore.open(tmp_path).valid_mask()
    assert mask.tolist() == [i not in (2, 7) for i in range(10)]


def test_incomplete_store_is_refused_unless_asked(tmp_path, data):
    _write_store(tmp_path, _manifest(), data, skip={1})
    with pytest.raises(DataError, match=r"incomplete.*shard-00001"):
        VectorStore.open(tmp_path)
    store = VectorStore.open(tmp_path, allow_incomplete=True)
    assert not store.complete
    loaded = store.load(1)
    assert torch.isnan(loaded[4:8]).all()
    assert torch.equal(loaded[:4], data[1][:4]) and torch.equal(loaded[8:], data[1][8:])
    assert store.valid_mask().tolist() == [not 4 <= i < 8 for i in range(10)]


def test_write_shard_is_atomic(tmp_path, monkeypatch, data):
    import pairtrace.store as store_module

    def failing_save(tensors, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path, 0, {"layer_1": data[1]})
    assert not shard_path(tmp_path, 0).exists()  # no half-written shard under the final name
    assert not list(tmp_path.iterdir())
    (tmp_path / ".shard-00000.safetensors.abc.tmp").write_bytes(b"left over")
    remove_temporary_files(tmp_path)
    assert not list(tmp_path.iterdir())


def test_check_compatible_names_each_differing_field():
    found = _manifest()
    expected = found.to_dict()
    check_compatible(expected, found)  # identical: passes
    same_model_elsewhere = dict(expected, model=dict(MODEL, name="/elsewhere/m0"))
    check_compatible(same_model_elsewhere, found)  # the weights hash decides, not the path
    changed = dict(
        expected,
        model=dict(MODEL, weights_hash="sha256:bbb"),
        layers=[2],
        dataset={"origin": "pairs.jsonl", "fingerprint": "ggg", "n_pairs": 10},
    )
    with pytest.raises(ManifestMismatchError) as info:
        check_compatible(changed, found, where="vectors/")
    message = str(info.value)
    assert message.startswith("vectors/:")
    for text in ("model:", "sha256:bbb", "sha256:aaa", "layers: expected [2], found [1, 3]", "dataset:", "ggg", "fff"):
        assert text in message
    assert "template" not in message
    with pytest.raises(ManifestMismatchError, match="template: expected plain"):
        check_compatible(dict(expected, template={"mode": "plain", "hash": "x"}), found, fields=("template",))
    with pytest.raises(ManifestMismatchError, match="shard_size: expected 8, found 4"):
        check_compatible(dict(expected, shard_size=8), found, fields=("shard_size",))
    check_compatible({"layers": [3, 1]}, found, fields=("layers",))  # order does not matter
    with pytest.raises(KeyError):
        check_compatible({"layers": [1, 3]}, found)


def test_pair_metadata_writer_streams_and_commits_atomically(tmp_path):
    from pairtrace.data.types import Pair
    from pairtrace.store import PAIRS_NAME, PairMetadataWriter, read_pair_metadata

    pairs = [Pair(id=f"p{i}", row=i, prompt=(), chosen="a", rejected="b", source=None if i % 2 else "s",
                  chosen_model=f"m{i}") for i in range(10)]
    with PairMetadataWriter(tmp_path / PAIRS_NAME, rows_per_group=3) as writer:
        for p in pairs:
            writer.add(p)
        assert not (tmp_path / PAIRS_NAME).exists()  # nothing under the final name before commit
        writer.commit()
    frame = read_pair_metadata(tmp_path / PAIRS_NAME)
    assert frame["id"].tolist() == [p.id for p in pairs] and frame["row"].tolist() == list(range(10))
    assert frame["source"].tolist()[:2] == ["s", None] and frame["rejected_model"].isna().all()
    with pytest.raises(RuntimeError), PairMetadataWriter(tmp_path / "other.parquet") as writer:
        writer.add(pairs[0])
        raise RuntimeError("interrupted")
    assert not (tmp_path / "other.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [PAIRS_NAME]  # the temporary file is gone too
    with pytest.raises(DataError, match="no column"):
        read_pair_metadata(tmp_path / PAIRS_NAME, columns=["id", "score"])


def test_manifest_with_ids_in_a_side_file(tmp_path, data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = _manifest(ids=[], n_rows=10, ids_file="ids.parquet")
    assert manifest.n == 10 and manifest.shard_range(2) == (8, 10)
    _write_store(tmp_path, manifest, data)
    with pytest.raises(DataError, match="ids_file"):
        VectorStore.open(tmp_path)
    pq.write_table(pa.table({"id": [f"id-{i}" for i in range(10)]}), tmp_path / "ids.parquet")
    store = VectorStore.open(tmp_path)
    assert store.ids == [f"id-{i}" for i in range(10)] and store.pair_metadata() is None
    assert torch.equal(store.read_rows(1, 3, 9), data[1][3:9])
    assert store.read_rows(3, 4, 4).shape == (0, 5)
    with pytest.raises(DataError, match="outside"):
        store.read_rows(1, 5, 11)
    old_reader = Manifest.from_dict({k: v for k, v in _manifest().to_dict().items() if k != "extraction"})
    assert old_reader.n == 10 and old_reader.extraction == {}
