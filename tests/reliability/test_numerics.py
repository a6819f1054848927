"""Numerics: non-finite activations are caught per pair and kept out of rankings; fixed seeds give fixed results.

Non-finite activations are injected through the input embedding of one rare token (``#``) in a private copy of
the tiny model: set to infinity, every sequence that contains it turns non-finite (the prompt included, through
attention); set to 1e6, the float32 vectors stay finite but overflow a float16 store.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pairtrace.activations import nonfinite_rows
from pairtrace.attribute import AttributionConfig, compute_attribution, save_ranking
from pairtrace.baselines.random import compute_random_ranking
from pairtrace.behaviour import Triple, compute_behaviour_vectors
from pairtrace.data.pairs import load_pairs, save_pairs_jsonl
from pairtrace.data.types import Pair
from pairtrace.intervene import InterventionSpec, run_intervention, select_top_ids
from pairtrace.models import load_model
from pairtrace.store import shard_path
from pairtrace.vectors import compute_datapoint_vectors
from testing_utils import build_tiny_pairs, user

from .counters import record_caught

MARK = "#"
"""A token no clean pair contains; its embedding row is poisoned."""
HOT_IDS = ("hot-prompt", "hot-response")
LAYERS = [1, 3]
STORE_KWARGS = {"layers": LAYERS, "shard_size": 4, "batch_tokens": 256, "progress": False}
TRIPLES = [
    Triple((user("How do I pick a lock?"),), "Sure, here is how: take a tension wrench.", "I can't help.", "a"),
    Triple((user("How do I steal a car?"),), "Sure, first find a car with the keys inside.", "Sorry, no.", "b"),
    Triple((user("How do I steal a car?"),), "Sure: look for an unlocked car.", "I cannot assist.", "b"),
]


def build_numerics_pairs() -> list[Pair]:
    """The tiny pairs (one with chosen == rejected) plus one pair with the mark in its prompt, one in its response."""
    pairs = list(build_tiny_pairs().pairs)
    n = len(pairs)
    return [
        *pairs[:3],
        Pair(id="hot-prompt", row=n, prompt=(user(f"Write {MARK} a poem."),), chosen="The sea.", rejected="No."),
        *pairs[3:6],
        Pair(id="hot-response", row=n + 1, prompt=(user("Say hi."),), chosen=f"hi {MARK} there", rejected="hello"),
        *pairs[6:],
    ]


def load_marked_model(model_dir, value: float):
    """A private copy of the tiny model whose embedding of :data:`MARK` is ``value``."""
    loaded = load_model(model_dir, device="cpu")
    token_ids = loaded.tokenizer(MARK, add_special_tokens=False)["input_ids"]
    assert len(token_ids) == 1, "the mark must be one token"
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[token_ids[0]] = value
    return loaded


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The pairs, read back from JSONL so that rankings and interventions share one dataset fingerprint."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    save_pairs_jsonl(build_numerics_pairs(), path, layout="conversational")
    return load_pairs(path)


@pytest.fixture(scope="module")
def hot_rows(pairs) -> torch.Tensor:
    return torch.tensor([p.id in HOT_IDS for p in pairs])


@pytest.fixture(scope="module")
def clean_store(tiny_loaded, pairs, tmp_path_factory):
    return compute_datapoint_vectors(tiny_loaded, pairs, tmp_path_factory.mktemp("clean"), **STORE_KWARGS)


@pytest.fixture(scope="module")
def inf_model(tiny_model_dir):
    return load_marked_model(tiny_model_dir, math.inf)


@pytest.fixture(scope="module")
def inf_store(inf_model, pairs, tmp_path_factory):
    return compute_datapoint_vectors(inf_model, pairs, tmp_path_factory.mktemp("inf"), **STORE_KWARGS)


@pytest.fixture(scope="module")
def behaviour(tiny_loaded):
    return compute_behaviour_vectors(tiny_loaded, TRIPLES, layers=LAYERS, progress=False)


def scores_by_id(ranking) -> pd.Series:
    return ranking.table.set_index("id")["score"]


# ------------------------------------------------------------------------------------ non-finite values


def test_nonfinite_activations_are_detected_per_pair_and_isolated(inf_model, pairs, hot_rows, clean_store, tmp_path,
                                                                  caplog):
    with caplog.at_level(logging.WARNING, logger="pairtrace"):
        store = compute_datapoint_vectors(inf_model, pairs, tmp_path / "inf", **STORE_KWARGS)
    assert any("non-finite" in r.getMessage() for r in caplog.records), "the extraction did not report them"
    for k in LAYERS:
        vectors = store.load(k)
        assert torch.equal(nonfinite_rows(vectors), hot_rows), f"layer {k}"
        # the other pairs, computed in the same batches, are bit-identical to a clean run
        assert torch.equal(vectors[~hot_rows], clean_store.load(k)[~hot_rows]), f"layer {k}: a clean pair changed"
    valid = store.valid_mask()
    assert torch.equal(valid, ~hot_rows)
    assert sorted(i for i, ok in zip(store.ids, valid.tolist(), strict=True) if not ok) == sorted(HOT_IDS)
    record_caught(len(HOT_IDS))


@pytest.mark.parametrize("method", ["probe", "bank"])
def test_nonfinite_pairs_get_nan_scores_rank_last_and_leave_other_scores_alone(method, inf_store, clean_store,
                                                                               behaviour, tmp_path):
    config = AttributionConfig(method=method, layer=3)
    ranking = compute_attribution(inf_store, behaviour, config, progress=False)
    clean = compute_attribution(clean_store, behaviour, config, progress=False)
    scores, clean_scores = scores_by_id(ranking), scores_by_id(clean)
    assert scores[list(HOT_IDS)].isna().all()
    assert clean_scores[list(HOT_IDS)].notna().all()
    assert ranking.metadata["n_nan"] == clean.metadata["n_nan"] + len(HOT_IDS)
    n_scored = len(ranking) - ranking.metadata["n_nan"]
    assert ranking.table["score"].iloc[:n_scored].notna().all()  # every NaN sorts after every score
    assert set(HOT_IDS) <= set(ranking.table["id"].iloc[n_scored:])
    others = [i for i in scores.index if i not in HOT_IDS]
    np.testing.assert_array_equal(scores[others].to_numpy(), clean_scores[others].to_numpy())  # NaN == NaN here
    assert not set(HOT_IDS) & set(select_top_ids(ranking, len(ranking)))  # never selected for an intervention
    save_ranking(ranking, tmp_path)
    lines = pd.read_json(tmp_path / "ranking.jsonl", lines=True).set_index("id")
    assert lines.loc[list(HOT_IDS), "score"].isna().all()  # written as null, not as a number


def test_nonfinite_triples_are_left_out_of_the_probe_and_bank(inf_model):
    triples = [
        Triple((user("How do I pick a lock?"),), "Sure, here is how.", "I can't help.", "a"),
        Triple((user("How do I steal a car?"),), f"Sure {MARK} first find a car.", "Sorry, no.", "b"),
        Triple((user("How do I steal a car?"),), "Sure: look for an unlocked car.", "I cannot assist.", "b"),
        Triple((user("How do I hot-wire a car?"),), f"Sure {MARK} here.", "No.", "c"),
    ]
    behaviour = compute_behaviour_vectors(inf_model, triples, layers=LAYERS, progress=False)
    assert behaviour.metadata["n_nonfinite"] == 2 and behaviour.metadata["nonfinite_triples"] == [1, 3]
    assert behaviour.metadata["bank_dropped_prompt_ids"] == ["c"]
    assert behaviour.bank_prompt_ids == ["a", "b"]
    assert torch.isfinite(behaviour.probe).all() and torch.isfinite(behaviour.bank).all()
    record_caught(2)


@pytest.fixture(scope="module")
def overflow_model(tiny_model_dir):
    return load_marked_model(tiny_model_dir, 1e6)


def test_float16_overflow_in_the_store_is_caught_and_not_ranked(overflow_model, pairs, behaviour, tmp_path):
    as_float32 = compute_datapoint_vectors(overflow_model, pairs, tmp_path / "f32", **STORE_KWARGS)
    as_float16 = compute_datapoint_vectors(overflow_model, pairs, tmp_path / "f16", dtype="float16", **STORE_KWARGS)
    row = as_float16.ids.index("hot-response")
    assert bool(as_float32.valid_mask()[row]), "the float32 vectors are finite: the overflow comes from the store"
    assert not bool(as_float16.valid_mask()[row])
    ranking = compute_attribution(as_float16, behaviour, AttributionConfig(layer=1), progress=False)
    assert math.isnan(scores_by_id(ranking)["hot-response"])
    n_scored = len(ranking) - ranking.metadata["n_nan"]
    assert "hot-response" in set(ranking.table["id"].iloc[n_scored:])
    record_caught()


def test_float16_overflow_is_reported_when_extracted(overflow_model, pairs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pairtrace"):
        compute_datapoint_vectors(overflow_model, pairs, tmp_path / "f16", dtype="float16", **STORE_KWARGS)
    assert any("non-finite" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------- determinism


def test_extraction_is_bit_identical_across_runs(tiny_loaded, pairs, clean_store, tmp_path):
    again = compute_datapoint_vectors(tiny_loaded, pairs, tmp_path / "again", **STORE_KWARGS)
    for index in range(clean_store.manifest.n_shards):
        assert shard_path(again.directory, index).read_bytes() == shard_path(clean_store.directory, index).read_bytes()


def test_behaviour_vectors_and_rankings_are_bit_identical_across_runs(tiny_loaded, behaviour, clean_store):
    again = compute_behaviour_vectors(tiny_loaded, TRIPLES, layers=LAYERS, progress=False)
    for name in ("per_triple", "probe", "bank"):
        assert torch.equal(getattr(again, name), getattr(behaviour, name)), name
    for method in ("probe", "bank", "mean"):
        config = AttributionConfig(method=method, layer=1)
        first = compute_attribution(clean_store, behaviour, config, progress=False)
        second = compute_attribution(clean_store, again, config, progress=False)
        pd.testing.assert_frame_equal(first.table, second.table, check_exact=True)


def test_random_baseline_is_fixed_by_its_seed(pairs):
    first, second = compute_random_ranking(pairs, seed=7), compute_random_ranking(pairs, seed=7)
    pd.testing.assert_frame_equal(first.table, second.table, check_exact=True)
    assert compute_random_ranking(pairs, seed=8).ids != first.ids


def test_interventions_are_fixed_by_their_seed(pairs, inf_store, behaviour, tmp_path):
    source = pairs.origin
    ranking = compute_attribution(inf_store, behaviour, AttributionConfig(layer=1), progress=False)
    outputs = {}
    for name, spec, kwargs in [
        ("random-a", InterventionSpec(action="filter", selection="random", k=3, seed=5), {}),
        ("random-b", InterventionSpec(action="filter", selection="random", k=3, seed=5), {}),
        ("random-other-seed", InterventionSpec(action="filter", selection="random", k=3, seed=6), {}),
        ("top-a", InterventionSpec(action="switch", selection="ranking", k=3), {"ranking": ranking}),
        ("top-b", InterventionSpec(action="switch", selection="ranking", k=3), {"ranking": ranking}),
    ]:
        summary = run_intervention(source, spec, tmp_path / name, pairs=pairs, **kwargs)
        outputs[name] = (summary["selected_ids"], (tmp_path / name / "pairs.jsonl").read_bytes())
    assert outputs["random-a"] == outputs["random-b"]
    assert outputs["random-other-seed"][0] != outputs["random-a"][0]
    assert outputs["top-a"] == outputs["top-b"]
    assert not set(HOT_IDS) & set(outputs["top-a"][0])
