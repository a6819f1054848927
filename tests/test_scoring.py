"""Tests for pairtrace.scoring: the fused chunked scorer, faiss, and sharded scoring against compute_attribution."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pairtrace.attribute import AttributionConfig, compute_attribution
from pairtrace.errors import ConfigError, DataError
from pairtrace.scoring import (
    chunk_memory_bytes,
    faiss_available,
    merge_score_parts,
    part_path,
    rank_store,
    score_rows,
    score_store_part,
    suggest_chunk_rows,
)
from pairtrace.shard import ShardSpec
from pairtrace.store import Manifest, VectorStore, write_shard

MODEL = {"name": "m0", "revision": None, "weights_hash": "sha256:abc", "template_mode": "chat"}
TEMPLATE = {"mode": "chat", "hash": "sha256:t"}
N, D, SHARD = 50, 16, 8


@pytest.fixture
def store(tmp_path) -> VectorStore:
    gen = torch.Generator().manual_seed(0)
    data = {k: torch.randn(N, D, generator=gen) for k in (2, 5)}
    data[2][3] = 0.0  # no direction
    data[2][17, 4] = float("nan")
    data[2][30, 0] = float("inf")
    manifest = Manifest(
        kind="datapoint", model=dict(MODEL), layers=[2, 5], template=dict(TEMPLATE),
        dataset={"origin": "x", "fingerprint": "f", "n_pairs": N}, ids=[f"id-{i}" for i in range(N)],
        shard_size=SHARD, dtype="float32", n_shards=(N + SHARD - 1) // SHARD, hidden_size=D,
    )
    manifest.save(tmp_path)
    for index in range(manifest.n_shards):
        start, end = manifest.shard_range(index)
        tensors = {f"layer_{k}": v[start:end] for k, v in data.items()}
        tensors["n_response_tokens"] = torch.ones(end - start, 2, dtype=torch.long)
        write_shard(tmp_path, index, tensors)
    return VectorStore.open(tmp_path)


@pytest.fixture
def behaviour():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(7, 2, D, generator=gen)
    return SimpleNamespace(layers=[2, 5], probe=bank.mean(0), bank=bank, per_triple=bank,
                           metadata={"model": MODEL, "template": TEMPLATE, "n_triples": 7})


def _scores_by_id(ranking) -> dict:
    return dict(zip(ranking.table["id"], ranking.table["score"], strict=True))


@pytest.mark.parametrize("method", ["probe", "bank", "mean"])
@pytest.mark.parametrize("layer", [2, 5])
def test_rank_store_matches_compute_attribution(store, behaviour, method, layer):
    config = AttributionConfig(method=method, layer=layer, chunk_rows=7)
    expected = compute_attribution(store, behaviour, config, progress=False)
    fused = rank_store(store, behaviour, config, progress=False)
    a, b = _scores_by_id(fused), _scores_by_id(expected)
    assert a.keys() == b.keys()
    values_a = np.array([a[k] for k in sorted(a)])
    values_b = np.array([b[k] for k in sorted(b)])
    np.testing.assert_allclose(values_a, values_b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert fused.metadata["n_nan"] == expected.metadata["n_nan"] == (3 if layer == 2 else 0)
    assert fused.table["id"].tolist()[-fused.metadata["n_nan"]:] == expected.table["id"].tolist()[
        -expected.metadata["n_nan"]:
    ]  # the same rows rank last
    if method == "bank":  # the true max of the cosines, never floored
        x = store.load(layer)
        u = behaviour.bank[:, [2, 5].index(layer)]
        cos = torch.nn.functional.cosine_similarity(x[:, None], u[None], dim=2).max(1).values
        assert a["id-1"] == pytest.approx(float(cos[1]), abs=1e-6)


def test_torch_engine_is_the_attribution_scorer(store, behaviour):
    from pairtrace.attribute import behaviour_matrix, score_chunk

    chunk = store.read_rows(2, 0, SHARD)
    units = behaviour_matrix(behaviour, 2, "bank")
    torch.testing.assert_close(score_rows(chunk.clone(), units, "bank"), score_chunk(chunk, units, "bank"),
                               rtol=0, atol=0, equal_nan=True)


def test_score_rows_marks_rows_without_direction():
    chunk = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0], [-3.0, -4.0]])
    units = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    bank = score_rows(chunk.clone(), units, "bank")
    assert bank[0] == pytest.approx(1.0) and bank[3] == pytest.approx(-0.6)  # max cosine, negative kept
    assert torch.isnan(bank[1]) and torch.isnan(bank[2])
    assert score_rows(chunk.clone(), units[:1], "probe")[3] == pytest.approx(-1.0)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
@pytest.mark.parametrize("method", ["probe", "bank"])
def test_faiss_engine_gives_the_same_scores(store, behaviour, method):
    config = AttributionConfig(method=method, layer=2, chunk_rows=16)
    a = _scores_by_id(rank_store(store, behaviour, config, engine="faiss", progress=False))
    b = _scores_by_id(rank_store(store, behaviour, config, progress=False))
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5, atol=1e-6)


def test_bad_engine_settings(store, behaviour):
    with pytest.raises(ConfigError, match="engine"):
        rank_store(store, behaviour, AttributionConfig(), engine="annoy", progress=False)
    with pytest.raises(ConfigError, match="mean"):
        rank_store(store, behaviour, AttributionConfig(method="mean"), engine="faiss", progress=False)


def test_sharded_scoring_merges_to_the_same_ranking(store, behaviour, tmp_path):
    config = AttributionConfig(method="bank", layer=2, chunk_rows=5)
    parts = tmp_path / "parts"
    with pytest.raises(DataError, match="no score parts"):
        merge_score_parts(store, behaviour, config, parts)
    paths = [score_store_part(store, behaviour, config, f"{i}/3", parts, progress=False) for i in range(2)]
    assert paths[1] == part_path(parts, ShardSpec(1, 3))
    with pytest.raises(DataError, match="2 part file"):
        merge_score_parts(store, behaviour, config, parts)
    score_store_part(store, behaviour, config, ShardSpec(2, 3), parts, progress=False)
    merged = merge_score_parts(store, behaviour, config, parts)
    whole = rank_store(store, behaviour, config, progress=False)
    assert merged.table.equals(whole.table)
    assert merged.metadata["n_parts"] == 3
    with pytest.raises(DataError, match="method"):
        merge_score_parts(store, behaviour, AttributionConfig(method="probe", layer=2), parts)


def test_chunk_sizing():
    assert chunk_memory_bytes(16384, 4096, 1000) == 16384 * (5 * 4096 + 4 * 1000)
    rows = suggest_chunk_rows(4096, 1000, budget_bytes=1 << 30)
    assert chunk_memory_bytes(rows, 4096, 1000) <= 1 << 30 < chunk_memory_bytes(2 * rows, 4096, 1000)
    assert suggest_chunk_rows(10**9, 1) == 256
