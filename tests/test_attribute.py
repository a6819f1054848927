"""Cosine scoring and rankings, on in-memory stores (the real store is covered in test_store / test_vectors)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pairtrace.attribute import (
    AttributionConfig,
    build_ranking,
    compute_attribution,
    load_ranking,
    rank_scores,
    save_ranking,
)
from pairtrace.errors import ManifestMismatchError, PairtraceError
from testing_utils import STORE_MODEL as MODEL
from testing_utils import STORE_TEMPLATE as TEMPLATE
from testing_utils import MemoryStore


def behaviour(probe: torch.Tensor, bank: torch.Tensor, layers=(2,), model=MODEL, template=TEMPLATE):
    # probe [L, d], bank [b, L, d]
    return SimpleNamespace(layers=list(layers), probe=probe, bank=bank, per_triple=bank,
                           metadata={"model": model, "template": template, "n_triples": len(bank)})


def test_probe_scores_are_cosines_and_zero_vectors_are_nan_and_last():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen)
    x[7] = 0.0  # identical chosen and rejected
    x[11, 3] = float("nan")  # non-finite activation
    probe = torch.randn(1, 8, generator=gen)
    store = MemoryStore({2: x}, [f"p{i}" for i in range(50)])
    ranking = compute_attribution(store, behaviour(probe, probe[None]), AttributionConfig(chunk_rows=7),
                                  progress=False)
    expected = torch.nn.functional.cosine_similarity(x, probe, dim=1).numpy()
    by_id = dict(zip(ranking.table["id"], ranking.table["score"], strict=True))
    for i in range(50):
        if i in (7, 11):
            assert math.isnan(by_id[f"p{i}"])
        else:
            assert by_id[f"p{i}"] == pytest.approx(float(expected[i]), abs=1e-6)
    assert ranking.metadata["n_nan"] == 2
    assert set(ranking.table["id"].tail(2)) == {"p7", "p11"}
    scored = ranking.table["score"].head(48).to_numpy()
    assert np.all(np.diff(scored) <= 0)
    assert ranking.table["rank"].tolist() == list(range(1, 51))
    assert ranking.top(3) == ranking.table["id"].head(3).tolist()


@pytest.mark.parametrize("chunk_rows", [1, 5, 64, 10_000])
def test_scores_do_not_depend_on_chunk_size(chunk_rows):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    probe = torch.randn(1, 16, generator=gen)
    store = MemoryStore({2: x}, [str(i) for i in range(64)])
    base = compute_attribution(store, behaviour(probe, probe[None]), AttributionConfig(chunk_rows=64),
                               progress=False)
    other = compute_attribution(store, behaviour(probe, probe[None]), AttributionConfig(chunk_rows=chunk_rows),
                                progress=False)
    pd.testing.assert_frame_equal(base.table, other.table)


def test_bank_is_the_true_max_never_floored_at_zero():
    # every datapoint points away from every bank vector: all maxima are negative
    bank = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [b=2, L=1, d=2]
    x = torch.tensor([[-1.0, -0.2], [-0.3, -1.0], [-1.0, -1.0]])
    store = MemoryStore({2: x}, ["a", "b", "c"])
    ranking = compute_attribution(store, behaviour(bank[0], bank), AttributionConfig(method="bank"), progress=False)
    scores = dict(zip(ranking.table["id"], ranking.table["score"], strict=True))
    units = torch.nn.functional.normalize(x, dim=1)
    expected = (units @ bank[:, 0, :].T).max(dim=1).values
    for key, val in zip("abc", expected.tolist(), strict=True):
        assert scores[key] == pytest.approx(val, abs=1e-6)
        assert scores[key] < 0


def test_planted_direction_ranks_on_top():
    gen = torch.Generator().manual_seed(2)
    d = 32
    direction = torch.randn(d, generator=gen)
    x = torch.randn(500, d, generator=gen)
    planted = torch.randperm(500, generator=gen)[:25]
    x[planted] += 4 * direction
    store = MemoryStore({2: x}, [f"id{i}" for i in range(500)])
    ranking = compute_attribution(store, behaviour(direction[None], direction[None, None]), progress=False)
    assert set(ranking.top(25)) == {f"id{i}" for i in planted.tolist()}


def test_layer_and_model_mismatch_are_refused():
    x = torch.randn(4, 8)
    probe = torch.randn(1, 8)
    store = MemoryStore({2: x}, list("abcd"))
    with pytest.raises(ManifestMismatchError, match="layer"):
        compute_attribution(store, behaviour(probe, probe[None], layers=(3,)), AttributionConfig(layer=2),
                            progress=False)
    with pytest.raises(ManifestMismatchError, match="not at layer 5"):
        compute_attribution(store, behaviour(probe, probe[None]), AttributionConfig(layer=5), progress=False)
    other = {**MODEL, "weights_hash": "zzz"}
    with pytest.raises(ManifestMismatchError, match="weights_hash"):
        compute_attribution(store, behaviour(probe, probe[None], model=other), progress=False)
    with pytest.raises(ManifestMismatchError, match="template"):
        compute_attribution(store, behaviour(probe, probe[None], template={"mode": "plain", "hash": None}),
                            progress=False)


def test_zero_behaviour_vector_is_an_error():
    store = MemoryStore({2: torch.randn(3, 4)}, list("abc"))
    with pytest.raises(PairtraceError, match="zero or non-finite"):
        compute_attribution(store, behaviour(torch.zeros(1, 4), torch.zeros(1, 1, 4)), progress=False)


def test_unknown_method_is_an_error():
    with pytest.raises(PairtraceError, match="unknown attribution method"):
        AttributionConfig(method="dot")


def test_rank_scores_puts_nan_last_and_is_stable():
    scores = np.array([0.5, np.nan, 0.9, 0.5, -1.0, np.nan])
    assert rank_scores(scores).tolist() == [2, 0, 3, 4, 1, 5]


def test_ranking_round_trip_with_metadata(tmp_path):
    meta = pd.DataFrame({"id": ["x", "y", "z"], "row": [10, 11, 12], "source": ["s1", "s2", None],
                         "chosen_model": ["A", "B", "C"], "rejected_model": ["D", "E", "F"]})
    ranking = build_ranking(["x", "y", "z"], np.array([0.1, np.nan, 0.7]), {"method": "probe", "layer": 2},
                            pair_metadata=meta)
    assert ranking.table["id"].tolist() == ["z", "x", "y"]
    assert ranking.table["row"].tolist() == [12, 10, 11]
    assert ranking.table["chosen_model"].tolist() == ["C", "A", "B"]
    path = save_ranking(ranking, tmp_path)
    back = load_ranking(path)
    pd.testing.assert_frame_equal(back.table, ranking.table)
    assert back.metadata["n_nan"] == 1
    lines = [json.loads(line) for line in (tmp_path / "ranking.jsonl").read_text().splitlines()]
    assert [rec["id"] for rec in lines] == ["z", "x", "y"]
    assert lines[-1]["score"] is None
    assert load_ranking(tmp_path).metadata["method"] == "probe"
