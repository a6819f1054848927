"""Response pooling: validation, wording, manifest records, refusal of mixed poolings, and the computation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pairtrace.errors import ConfigError, ManifestMismatchError
from pairtrace.models import check_response_tokens, describe_response_pooling
from pairtrace.pooling import MEAN, ResponsePooling, mean_of_responses
from pairtrace.store import Manifest


def test_validation_keeps_the_response_tokens_message():
    for bad in (0, -1, True, 2.0, "4"):
        message = f"response_tokens must be a positive number of tokens or None, got {bad!r}"
        with pytest.raises(ConfigError) as caught:
            ResponsePooling(bad)
        assert str(caught.value) == message
        with pytest.raises(ConfigError):
            check_response_tokens(bad)
    assert ResponsePooling() == MEAN == ResponsePooling(None) and ResponsePooling(4).tokens == 4


def test_describe_and_names_are_unchanged():
    assert MEAN.describe() == describe_response_pooling(None) == "every token"
    assert ResponsePooling(4).describe() == describe_response_pooling(4) == "the first 4 tokens"
    assert MEAN.name == "all-tokens" and ResponsePooling(2).name == "first-2-tokens"


def test_resolve_takes_either_form_and_refuses_a_disagreement():
    assert ResponsePooling.resolve(None, 4) == ResponsePooling(4)
    assert ResponsePooling.resolve(ResponsePooling(4), None) == ResponsePooling(4)
    assert ResponsePooling.resolve(ResponsePooling(4), 4) == ResponsePooling(4)
    assert ResponsePooling.resolve() == MEAN
    with pytest.raises(ConfigError, match="disagree"):
        ResponsePooling.resolve(ResponsePooling(4), 2)


def test_settings_round_trip_and_stores_without_the_key_pool_every_token():
    assert MEAN.to_settings() == {} and ResponsePooling(4).to_settings() == {"response_tokens": 4}
    for pooling in (MEAN, ResponsePooling(1), ResponsePooling(4)):
        assert ResponsePooling.from_settings({"max_length": 64, **pooling.to_settings()}) == pooling
    assert ResponsePooling.from_settings(None) == ResponsePooling.from_settings({"max_length": 2048}) == MEAN


def test_pooling_round_trips_through_a_store_manifest(tmp_path, tiny_loaded, tiny_pairs):
    from pairtrace.store import VectorStore
    from pairtrace.vectors import compute_datapoint_vectors

    for tokens in (None, 3):
        out = tmp_path / f"store-{tokens}"
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, out, layers=[2], max_length=64, progress=False,
                                  response_tokens=tokens)
        written = json.loads((out / "manifest.json").read_text())["settings"]
        # the same manifest fields as before the pooling object: no key for every token
        assert written == ({"max_length": 64} if tokens is None else {"max_length": 64, "response_tokens": 3})
        manifest = VectorStore.open(out).manifest
        assert manifest.pooling == ResponsePooling(tokens) and manifest.response_tokens == tokens
        assert Manifest.from_dict(json.loads((out / "manifest.json").read_text())).pooling == ResponsePooling(tokens)
    same = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "obj", layers=[2], max_length=64,
                                     progress=False, pooling=ResponsePooling(3))
    torch.testing.assert_close(same.load(2), VectorStore.open(tmp_path / "store-3").load(2), rtol=0, atol=0)


def test_behaviour_vectors_record_their_pooling(tiny_loaded):
    from pairtrace.behaviour import Triple, compute_behaviour_vectors

    triples = [Triple(({"role": "user", "content": "Hi?"},), "Sure, here is a short answer.", "No.", "p0")]
    bv = compute_behaviour_vectors(tiny_loaded, triples, layers=[2], progress=False, pooling=ResponsePooling(2))
    assert bv.pooling == ResponsePooling(2) and bv.metadata["settings"] == {"max_length": 2048, "response_tokens": 2}
    assert bv.metadata["n_response_tokens"][0][0] == 2 and 1 <= bv.metadata["n_response_tokens"][0][1] <= 2


def test_mismatched_poolings_are_refused_with_the_same_message():
    from pairtrace.attribute import check_behaviour_matches_store

    assert MEAN.mismatch(MEAN) is None and ResponsePooling(4).mismatch(ResponsePooling(4)) is None
    assert ResponsePooling(4).mismatch(MEAN) == (
        "response_tokens (tokens pooled per response; None = all): datapoint vectors 4 vs behaviour vectors None")

    def store_with(settings):
        return SimpleNamespace(manifest=SimpleNamespace(model={}, template={}, settings=settings))

    behaviour = SimpleNamespace(metadata={"settings": {"max_length": 2048}})
    check_behaviour_matches_store(store_with({"max_length": 2048}), behaviour)  # both every token
    with pytest.raises(ManifestMismatchError) as caught:
        check_behaviour_matches_store(store_with({"max_length": 2048, "response_tokens": 4}), behaviour)
    assert str(caught.value) == (
        "behaviour vectors and datapoint vectors come from different settings: response_tokens (tokens pooled "
        "per response; None = all): datapoint vectors 4 vs behaviour vectors None")


def test_keep_weights_and_reduce_give_the_response_mean():
    assert ResponsePooling(2).keep([5, 6, 7]) == [5, 6] and MEAN.keep((5, 6, 7)) == [5, 6, 7]
    assert torch.equal(MEAN.weights(3), torch.ones(3))
    hidden = torch.randn(1, 5, 4)  # [B, T, d]
    masks = torch.zeros(1, 2, 5)  # [B, S, T]
    masks[0, 0, 1:3] = MEAN.weights(2)
    sums = torch.einsum("bst,btd->bsd", masks, hidden)[:, :, None]  # [B, S, L=1, d]
    means = MEAN.reduce(sums, masks)  # [B, S, 1, d]
    torch.testing.assert_close(means[0, 0, 0], hidden[0, 1:3].mean(0))
    assert bool(means[0, 1].isnan().all())  # an empty segment has no mean
    rows = torch.tensor([[1.0, 2.0], [float("nan"), float("nan")], [3.0, 4.0]])
    assert torch.equal(mean_of_responses(rows), torch.tensor([2.0, 3.0]))
