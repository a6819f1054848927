"""The random baseline: seeded, complete, in the standard ranking format."""

from __future__ import annotations

import numpy as np

from pairtrace.attribute import RANKING_COLUMNS
from pairtrace.baselines.random import compute_random_ranking
from pairtrace.data.types import Pair
from testing_utils import build_pair_set, user


def make_pairs(n: int = 50):
    return build_pair_set([Pair(id=f"p{i}", row=i, prompt=(user(f"q{i}"),), chosen="a", rejected="b",
                                source="src" if i % 2 else None) for i in range(n)])


def test_same_seed_same_ranking_other_seed_other_ranking():
    pairs = make_pairs()
    a, b, c = (compute_random_ranking(pairs, seed) for seed in (0, 0, 1))
    assert a.ids == b.ids
    assert a.ids != c.ids
    np.testing.assert_array_equal(a.table["score"], b.table["score"])


def test_format_and_scores():
    pairs = make_pairs()
    ranking = compute_random_ranking(pairs, 7)
    assert list(ranking.table.columns) == list(RANKING_COLUMNS)
    assert sorted(ranking.ids) == sorted(p.id for p in pairs)
    scores = ranking.table["score"].to_numpy()
    assert ((scores >= 0) & (scores < 1)).all() and (np.diff(scores) <= 0).all()
    assert ranking.table["rank"].tolist() == list(range(1, 51))
    by_id = ranking.table.set_index("id")
    assert by_id.loc["p3", "row"] == 3 and by_id.loc["p3", "source"] == "src"
    assert ranking.metadata["method"] == "random" and ranking.metadata["seed"] == 7
    assert ranking.metadata["n_nan"] == 0 and ranking.metadata["cost"]["flops_estimate"] == 0.0
    assert ranking.ids != [p.id for p in pairs]  # not the input order


def test_empty_pair_set():
    ranking = compute_random_ranking(build_pair_set([]), 0)
    assert len(ranking) == 0
