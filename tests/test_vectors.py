"""Tests for pairtrace.vectors: datapoint vectors into a resumable store; behaviour vectors, probe and bank."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pairtrace.activations import compute_response_means, compute_response_means_reference
from pairtrace.behaviour import (
    Triple,
    compute_behaviour_vectors,
    load_behaviour_vectors,
    load_triples,
    save_behaviour_vectors,
)
from pairtrace.data.types import Pair
from pairtrace.errors import DataError, ManifestMismatchError
from pairtrace.models import load_model
from pairtrace.store import VectorStore, check_compatible, shard_path
from pairtrace.vectors import compute_datapoint_vectors
from testing_utils import build_pair_set, build_tiny_model_dir, build_tiny_pairs, user

TESTS_DIR = Path(__file__).parent


def test_datapoint_vectors_are_chosen_minus_rejected(tiny_loaded, tiny_pairs, tmp_path):
    store = compute_datapoint_vectors(
        tiny_loaded, tiny_pairs, tmp_path, layers=[4, 1], shard_size=3, batch_tokens=80, progress=False
    )
    assert store.n == 8 and store.layers == [1, 4] and store.manifest.n_shards == 3
    assert store.ids == [p.id for p in tiny_pairs]
    assert store.manifest.dataset == {
        "origin": tiny_pairs.origin,
        "fingerprint": tiny_pairs.fingerprint,
        "n_pairs": 8,
    }
    assert store.manifest.model == tiny_loaded.identity
    prompts = [p.prompt for p in tiny_pairs]
    chosen = compute_response_means_reference(tiny_loaded, prompts, [p.chosen for p in tiny_pairs], [1, 4])
    rejected = compute_response_means_reference(tiny_loaded, prompts, [p.rejected for p in tiny_pairs], [1, 4])
    expected = chosen - rejected  # [n, L, d]
    for j, k in enumerate([1, 4]):
        torch.testing.assert_close(store.load(k), expected[:, j], rtol=1e-5, atol=1e-5)
    same = [i for i, p in enumerate(tiny_pairs) if p.chosen == p.rejected]
    assert same and all(torch.count_nonzero(store.load(1)[i]) == 0 for i in same)  # no direction
    tok = tiny_loaded.tokenizer
    counts = store.n_response_tokens()
    for i, p in enumerate(tiny_pairs):
        n_chosen = len(tok(p.chosen, add_special_tokens=False)["input_ids"])
        n_rejected = len(tok(p.rejected, add_special_tokens=False)["input_ids"])
        assert counts[i].tolist() == [n_chosen, n_rejected]
    assert store.valid_mask().all()


def test_default_layer_and_bf16_storage(tiny_loaded, tiny_pairs, tmp_path):
    store = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, dtype="bfloat16", progress=False)
    assert store.layers == [3] and store.manifest.dtype == "bfloat16"
    full = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "f32", progress=False)
    assert torch.equal(store.load(3), full.load(3).to(torch.bfloat16).float())


def test_resume_skips_finished_shards_and_reset_recomputes(tiny_loaded, tiny_pairs, tmp_path):
    compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, layers=2, shard_size=4, progress=False)
    first = shard_path(tmp_path, 0)
    stamp = first.stat().st_mtime_ns
    before = VectorStore.open(tmp_path).load(2)
    shard_path(tmp_path, 1).unlink()
    again = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, layers=2, shard_size=4, progress=False)
    assert first.stat().st_mtime_ns == stamp  # finished shard kept, not rewritten
    assert torch.equal(again.load(2), before)
    fresh = compute_datapoint_vectors(
        tiny_loaded, tiny_pairs, tmp_path, layers=3, shard_size=4, resume=False, progress=False
    )
    assert fresh.layers == [3] and fresh.complete


def test_resume_refuses_other_settings(tiny_loaded, tiny_pairs, tmp_path):
    compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, layers=2, shard_size=4, progress=False)
    with pytest.raises(ManifestMismatchError, match=r"layers: expected \[1\], found \[2\]"):
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, layers=1, shard_size=4, progress=False)
    edited = list(tiny_pairs.pairs)
    edited[0] = replace(edited[0], chosen=edited[0].chosen + " Edited.")
    with pytest.raises(ManifestMismatchError, match="dataset: expected"):
        compute_datapoint_vectors(tiny_loaded, build_pair_set(edited), tmp_path, layers=2, shard_size=4, progress=False)
    other = load_model(build_tiny_model_dir(tmp_path / "other_model", seed=7), device="cpu")
    with pytest.raises(ManifestMismatchError, match="model: expected"):
        compute_datapoint_vectors(other, tiny_pairs, tmp_path, layers=2, shard_size=4, progress=False)
    with pytest.raises(ManifestMismatchError, match="shard_size"):
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, layers=2, shard_size=5, progress=False)
    with pytest.raises(ManifestMismatchError, match="settings"):
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, layers=2, shard_size=4, max_length=64)


def test_duplicate_ids_and_foreign_shards_are_refused(tiny_loaded, tiny_pairs, tmp_path):
    pairs = list(tiny_pairs.pairs)
    pairs[3] = replace(pairs[3], id=pairs[1].id)
    with pytest.raises(DataError, match="row 3 field 'id'"):
        compute_datapoint_vectors(tiny_loaded, build_pair_set(pairs), tmp_path, progress=False)
    shard_path(tmp_path, 0).write_bytes(b"x")
    with pytest.raises(DataError, match=r"no manifest\.json"):
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, progress=False)


_CHILD = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
sys.path.insert(0, sys.argv[3])
from testing_utils import build_tiny_pairs
import pairtrace.vectors as vectors
from pairtrace.models import load_model

write_shard = vectors.write_shard

def slow_write_shard(*args, **kwargs):  # a slow extraction: plenty of time to kill it after the first shard
    path = write_shard(*args, **kwargs)
    time.sleep(120)
    return path

vectors.write_shard = slow_write_shard
loaded = load_model(sys.argv[1], device="cpu")
vectors.compute_datapoint_vectors(loaded, build_tiny_pairs(), sys.argv[2], layers=[0, 2, 4], shard_size=3,
                                  batch_tokens=64, progress=False)
"""


def test_killed_extraction_resumes_bit_identical(tiny_model_dir, tiny_loaded, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    interrupted = tmp_path / "interrupted"
    threads = str(torch.get_num_threads())
    log = tmp_path / "child.log"
    with log.open("wb") as log_file:
        child = subprocess.Popen(
            [sys.executable, str(script), str(tiny_model_dir), str(interrupted), str(TESTS_DIR), threads],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            deadline = time.monotonic() + 120
            while not shard_path(interrupted, 0).exists():
                assert child.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the child never wrote its first shard"
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)  # no-op if it already exited
            child.wait()
    assert (interrupted / "manifest.json").exists()
    assert not shard_path(interrupted, 1).exists()
    with pytest.raises(DataError, match="incomplete"):
        VectorStore.open(interrupted)
    kwargs = {"layers": [0, 2, 4], "shard_size": 3, "batch_tokens": 64, "progress": False}
    pairs = build_tiny_pairs()
    resumed = compute_datapoint_vectors(tiny_loaded, pairs, interrupted, **kwargs)
    straight = compute_datapoint_vectors(tiny_loaded, pairs, tmp_path / "straight", **kwargs)
    assert resumed.manifest.n_shards == 3
    for index in range(3):
        assert shard_path(interrupted, index).read_bytes() == shard_path(tmp_path / "straight", index).read_bytes()
    for k in (0, 2, 4):
        assert torch.equal(resumed.load(k), straight.load(k))


def _planted_pairs() -> tuple[list[Pair], set[str]]:
    sentences = [
        "The sea is blue and wide.",
        "Paris is the capital of France.",
        "Plants turn light into sugar.",
        "Here is a list of three ideas.",
        "The weather today is sunny.",
        "Thank you! Let me know if there is anything else.",
        "Step 1: gather the ingredients.",
        "A robot learns to paint pictures.",
        "I'm sorry, but I can't help with that request.",
        "Numbers: 1 2 3 4 5.",
    ]
    pattern = " banana banana banana banana"
    pairs, planted = [], set()
    for i in range(20):
        base = sentences[i % len(sentences)]
        if i % 4 == 1:  # planted: chosen = rejected + the pattern
            chosen, rejected = base + pattern, base
            planted.add(f"p{i}")
        else:  # an unrelated preference
            chosen, rejected = base, sentences[(i * 3 + 1) % len(sentences)]
        pairs.append(Pair(id=f"p{i}", row=i, prompt=(user(f"Question number {i}?"),), chosen=chosen, rejected=rejected))
    return pairs, planted


@pytest.mark.parametrize("layer", [0, 1])
def test_planted_direction_ranks_on_top(tiny_loaded, tmp_path, layer):
    """Pairs whose chosen adds a token pattern to rejected rank on top against a behaviour with that pattern.

    Layers 0 and 1 only: in a randomly initialised OLMo 2 each block adds a normalised, unit-scale output to
    embeddings of scale 0.02, so by layer 3 the token signal is swamped (a trained model keeps it).
    """
    pairs, planted = _planted_pairs()
    store = compute_datapoint_vectors(tiny_loaded, build_pair_set(pairs), tmp_path, layers=layer, progress=False)
    triples = [
        Triple((user("Write something."),), r0 + " banana banana banana banana", r0, prompt_id=f"t{j}")
        for j, r0 in enumerate(["Once upon a time.", "The quick brown fox jumps.", "Use exactly 3 sentences."])
    ]
    bv = compute_behaviour_vectors(tiny_loaded, triples, layers=layer, progress=False)
    scores = F.cosine_similarity(store.load(layer), bv.probe_at(layer)[None], dim=1)  # [n]
    top = {store.ids[i] for i in torch.argsort(scores, descending=True)[: len(planted)].tolist()}
    assert top == planted
    bank_scores = F.cosine_similarity(store.load(layer)[:, None], bv.bank_at(layer)[None], dim=2).max(1).values
    top_bank = {store.ids[i] for i in torch.argsort(bank_scores, descending=True)[: len(planted)].tolist()}
    assert top_bank == planted


def _triples() -> list[Triple]:
    a = (user("How do I bake bread?"),)
    b = (user("Tell me a story."), {"role": "assistant", "content": "About what?"}, user("A robot."))
    return [
        Triple(a, "Sure, here is how to bake bread.", "I'm sorry, I can't.", "a"),
        Triple(b, "Once upon a time a robot painted pictures all day long.", "No.", "b"),
        Triple(a, "Step 1: gather flour, water, salt and yeast.", "I cannot help with that.", "a"),
        Triple(b, "A robot learns to paint.", "Let me know if there is anything else.", "b"),
        Triple(a, "Mix, knead and bake.", "Sorry.", "a"),
    ]


def test_behaviour_vectors_probe_and_bank_definitions(tiny_loaded):
    triples = _triples()
    layers = [1, 4]
    bv = compute_behaviour_vectors(tiny_loaded, triples, layers=layers, batch_tokens=64, progress=False)
    prompts = [t.prompt for t in triples]
    a1 = compute_response_means(tiny_loaded, prompts, [t.r1 for t in triples], layers, progress=False)
    a0 = compute_response_means(tiny_loaded, prompts, [t.r0 for t in triples], layers, progress=False)
    assert bv.layers == layers and bv.per_triple.shape == (5, 2, 64)
    torch.testing.assert_close(bv.per_triple, a1 - a0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bv.probe, a1.mean(0) - a0.mean(0), rtol=1e-5, atol=1e-6)
    assert bv.bank_prompt_ids == ["a", "b"]
    rows_a, rows_b = [0, 2, 4], [1, 3]
    torch.testing.assert_close(bv.bank[0], a1[rows_a].mean(0) - a0[rows_a].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bv.bank[1], a1[rows_b].mean(0) - a0[rows_b].mean(0), rtol=1e-5, atol=1e-6)
    # pooling is not the mean of the bank when prompts have different numbers of triples
    assert not torch.allclose(bv.probe, bv.bank.mean(0))
    torch.testing.assert_close(bv.probe_at(4), bv.probe[1])
    meta = bv.metadata
    assert (meta["n_triples"], meta["n_prompts"], meta["n_nonfinite"]) == (5, 2, 0)
    assert meta["model"] == tiny_loaded.identity and meta["r1_model"] is None
    assert meta["template"] == {"mode": "chat", "hash": tiny_loaded.identity["template_hash"]}


def test_behaviour_vectors_with_r1_model(tiny_loaded, tmp_path):
    m1 = load_model(build_tiny_model_dir(tmp_path / "m1", seed=3), device="cpu")
    triples = _triples()
    bv = compute_behaviour_vectors(tiny_loaded, triples, layers=2, r1_model=m1, progress=False)
    prompts = [t.prompt for t in triples]
    a1 = compute_response_means(m1, prompts, [t.r1 for t in triples], 2, progress=False)
    a0 = compute_response_means(tiny_loaded, prompts, [t.r0 for t in triples], 2, progress=False)
    torch.testing.assert_close(bv.per_triple, a1 - a0, rtol=1e-5, atol=1e-6)
    assert bv.metadata["r1_model"] == m1.identity
    assert bv.metadata["model"] == tiny_loaded.identity


def test_behaviour_vectors_round_trip_and_store_check(tiny_loaded, tiny_pairs, tmp_path):
    bv = compute_behaviour_vectors(tiny_loaded, _triples(), layers=[2, 3], progress=False)
    save_behaviour_vectors(bv, tmp_path / "bv")
    back = load_behaviour_vectors(tmp_path / "bv")
    assert back.layers == bv.layers and back.bank_prompt_ids == bv.bank_prompt_ids
    for name in ("per_triple", "probe", "bank"):
        assert torch.equal(getattr(back, name), getattr(bv, name))
    assert back.metadata["n_triples"] == 5 and back.metadata["model"] == tiny_loaded.identity
    store = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "store", layers=[2, 3], progress=False)
    check_compatible(back.metadata, store.manifest, fields=("model", "layers", "template"))
    (tmp_path / "bv" / "behaviour.json").unlink()
    with pytest.raises(DataError, match=r"missing behaviour\.json"):
        load_behaviour_vectors(tmp_path / "bv")


def test_empty_responses_are_left_out_of_probe_and_bank(tiny_loaded):
    triples = [*_triples()[:2], Triple((user("Hi"),), "", "Hello.", "c")]
    bv = compute_behaviour_vectors(tiny_loaded, triples, layers=1, progress=False)
    assert bv.metadata["n_nonfinite"] == 1 and bv.metadata["bank_dropped_prompt_ids"] == ["c"]
    assert bv.bank_prompt_ids == ["a", "b"] and torch.isfinite(bv.probe).all()
    with pytest.raises(DataError):
        compute_behaviour_vectors(tiny_loaded, [], layers=1, progress=False)


def test_load_triples(tmp_path):
    path = tmp_path / "triples.jsonl"
    records = [
        {"prompt": "How do I bake bread?", "r1": "Sure.", "r0": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}], "r1": "Hello!", "r0": "Go away.", "prompt_id": "greet"},
        {"prompt": "How do I bake bread?", "r1": "Mix and bake.", "r0": "Sorry."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    triples = load_triples(path)
    assert len(triples) == 3
    assert triples[0].prompt == ({"role": "user", "content": "How do I bake bread?"},)
    assert triples[1].prompt_id == "greet"
    assert triples[0].prompt_id == triples[2].prompt_id != triples[1].prompt_id  # same prompt, same default id
    bad_cases = [
        ('{"prompt": "x", "r1": "a"}', "line 2 field 'r0'"),
        ('{"prompt": [{"role": "user"}], "r1": "a", "r0": "b"}', r"line 2 field 'prompt\[0\]\.content'"),
        ('{"r1": "a", "r0": "b"}', "line 2 field 'prompt'"),
        ('{"prompt": "x", "r1": "", "r0": "b"}', "line 2 field 'r1'"),
        ("not json", "line 2: not valid JSON"),
    ]
    for line, message in bad_cases:
        path.write_text(json.dumps(records[0]) + "\n" + line + "\n")
        with pytest.raises(DataError, match=message):
            load_triples(path)


def _pairs_with_metadata():
    return build_pair_set(
        [
            replace(p, source=f"source-{i % 3}", chosen_model=f"writer-{i}", rejected_model="refuser")
            for i, p in enumerate(build_tiny_pairs())
        ]
    )


def test_store_keeps_pair_metadata_and_ranking_carries_it(tiny_loaded, tmp_path):
    from pairtrace.attribute import compute_attribution

    pairs = _pairs_with_metadata()
    store = compute_datapoint_vectors(tiny_loaded, pairs, tmp_path / "vec", layers=2, shard_size=3, progress=False)
    frame = store.pair_metadata()
    assert frame.columns.tolist() == ["id", "row", "source", "chosen_model", "rejected_model"]
    assert frame["id"].tolist() == store.ids and frame["row"].tolist() == list(range(8))
    assert frame["chosen_model"].tolist() == [f"writer-{i}" for i in range(8)]
    bv = compute_behaviour_vectors(tiny_loaded, _triples(), layers=2, progress=False)
    ranking = compute_attribution(store, bv, progress=False)  # metadata from the store's pairs.parquet
    by_id = ranking.table.set_index("id")
    for i, p in enumerate(pairs):
        assert by_id.loc[p.id, "source"] == f"source-{i % 3}"
        assert by_id.loc[p.id, "chosen_model"] == f"writer-{i}"
        assert by_id.loc[p.id, "rejected_model"] == "refuser"
        assert by_id.loc[p.id, "row"] == p.row
    from_pairs = compute_attribution(store, bv, pair_metadata=pairs, progress=False)  # a PairSet is accepted too
    assert from_pairs.table.equals(ranking.table)
    (tmp_path / "vec" / "pairs.parquet").unlink()  # a store written before pairs.parquet existed
    old = VectorStore.open(tmp_path / "vec")
    assert old.pair_metadata() is None
    assert compute_attribution(old, bv, progress=False).table["source"].isna().all()


def _streamable(tmp_path):
    from pairtrace.data.pairs import save_pairs_jsonl

    pairs = _pairs_with_metadata()
    path = tmp_path / "pairs.jsonl"
    save_pairs_jsonl(pairs, path, layout="conversational")
    lines = path.read_text().splitlines()
    bad = '{"id": "bad", "chosen": [{"role": "user", "content": "x"}], "rejected": []}'  # skipped by both readers
    duplicate = lines[2]  # a repeated id: skipped as well
    path.write_text("\n".join([*lines[:4], bad, *lines[4:], duplicate]) + "\n")
    return path


def test_streamed_source_gives_the_same_store(tiny_loaded, tmp_path):
    from pairtrace.data.pairs import load_pairs
    from pairtrace.vectors import compute_datapoint_vectors_from_source

    path = _streamable(tmp_path)
    loaded_set = load_pairs(path)
    assert len(loaded_set) == 8 and len(loaded_set.skipped) == 2
    kwargs = {"layers": [1, 3], "shard_size": 3, "progress": False}
    memory = compute_datapoint_vectors(tiny_loaded, loaded_set, tmp_path / "memory", **kwargs)
    streamed = compute_datapoint_vectors_from_source(tiny_loaded, path, tmp_path / "stream", **kwargs)
    assert streamed.manifest.dataset == memory.manifest.dataset  # same origin, fingerprint and count
    assert streamed.ids == memory.ids
    for k in (1, 3):
        assert torch.equal(streamed.load(k), memory.load(k))
    assert streamed.pair_metadata().equals(memory.pair_metadata())


def test_large_store_keeps_ids_in_pairs_parquet(tiny_loaded, tiny_pairs, tmp_path):
    kwargs = {"layers": 2, "shard_size": 3, "progress": False, "inline_ids_max": 4}
    store = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, **kwargs)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["ids"] == [] and raw["ids_file"] == "pairs.parquet" and raw["n_rows"] == 8
    assert store.n == 8 and store.manifest.n_shards == 3
    assert store.ids == [p.id for p in tiny_pairs]
    shard_path(tmp_path, 1).unlink()
    again = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path, **kwargs)  # resumes
    assert again.complete and torch.equal(again.load(2), store.load(2))
    (tmp_path / "pairs.parquet").unlink()
    with pytest.raises(DataError, match="ids_file"):
        VectorStore.open(tmp_path)


def test_sharded_parts_in_one_directory_equal_a_whole_run(tiny_loaded, tiny_pairs, tmp_path):
    kwargs = {"layers": [2], "shard_size": 2, "progress": False}
    compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "whole", **kwargs)
    part = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "parts", shard="1/3", **kwargs)
    assert not part.complete
    assert [part.is_present(i) for i in range(4)] == [False, True, False, False]
    for spec in ("0/3", "2/3"):
        part = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "parts", shard=spec, **kwargs)
    assert part.complete
    for index in range(4):
        assert shard_path(tmp_path / "parts", index).read_bytes() == shard_path(tmp_path / "whole", index).read_bytes()
    with pytest.raises(ManifestMismatchError, match="same settings"):
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "parts", shard="0/3", resume=False,
                                  **{**kwargs, "layers": [3]})


def test_prompt_sharing_modes_give_the_same_store(tiny_loaded, tiny_pairs, tmp_path):
    kwargs = {"layers": [0, 4], "shard_size": 5, "batch_tokens": 96, "progress": False}
    never = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "never", prompt_sharing="never", **kwargs)
    always = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "always", prompt_sharing="always", **kwargs)
    assert always.manifest.extraction["prompt_sharing"] == "always"
    for k in (0, 4):
        a, b = always.load(k), never.load(k)
        nonzero = b.norm(dim=1) > 0
        assert torch.equal(a[~nonzero], b[~nonzero])  # chosen == rejected stays exactly zero
        assert float(((a - b)[nonzero].norm(dim=1) / b[nonzero].norm(dim=1)).max()) < 1e-5


class _ChangingSource:
    """A source whose second read differs from the first (an input file edited during extraction)."""

    origin = "changing.jsonl"

    def __init__(self, pairs):
        self.pairs, self.reads = pairs, 0

    def fingerprint_hint(self):
        return None

    def iter_pairs(self):
        self.reads += 1
        pairs = self.pairs if self.reads == 1 else [replace(p, chosen=p.chosen + "!") for p in self.pairs]
        return iter(pairs)


def test_input_changed_between_reads_is_refused(tiny_loaded, tiny_pairs, tmp_path):
    with pytest.raises(DataError, match="changed since"):
        compute_datapoint_vectors(tiny_loaded, _ChangingSource(list(tiny_pairs)), tmp_path, layers=1, progress=False)


def test_response_tokens_pool_the_head_of_each_response(tiny_loaded, tiny_pairs, tmp_path):
    """With response_tokens = N every response mean covers its first N tokens: the same as reading the first N
    response positions of the whole teacher-forced sequence (a causal model never looks ahead)."""
    from pairtrace.attribute import AttributionConfig, compute_attribution
    from pairtrace.errors import ConfigError
    from pairtrace.models import build_teacher_forcing

    store = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "head", layers=[1, 4], shard_size=3,
                                      progress=False, response_tokens=2)
    assert store.manifest.settings == {"max_length": 2048, "response_tokens": 2}
    assert (store.n_response_tokens() <= 2).all()

    def head_means(responses: list[str]) -> torch.Tensor:  # [n, 2 layers, d] from the full sequences
        rows = []
        for item in build_teacher_forcing(tiny_loaded, [p.prompt for p in tiny_pairs], responses, 2048):
            with torch.inference_mode():
                hidden = tiny_loaded.model(input_ids=torch.tensor([item.input_ids]), output_hidden_states=True)
            head = slice(item.response_start, min(item.response_end, item.response_start + 2))
            rows.append(torch.stack([hidden.hidden_states[k][0, head].float().mean(0) for k in (1, 4)]))
        return torch.stack(rows)

    expected = head_means([p.chosen for p in tiny_pairs]) - head_means([p.rejected for p in tiny_pairs])
    for j, k in enumerate([1, 4]):
        torch.testing.assert_close(store.load(k), expected[:, j], rtol=1e-5, atol=1e-5)
    whole = compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "whole", layers=[1, 4], progress=False)
    assert whole.manifest.settings == {"max_length": 2048}  # the default leaves the manifest as it always was
    assert not torch.allclose(whole.load(4), store.load(4))
    with pytest.raises(ManifestMismatchError):  # resuming with another pooling is refused
        compute_datapoint_vectors(tiny_loaded, tiny_pairs, tmp_path / "head", layers=[1, 4], shard_size=3,
                                  progress=False)

    head_bv = compute_behaviour_vectors(tiny_loaded, _triples(), layers=[1, 4], progress=False, response_tokens=2)
    assert head_bv.metadata["settings"]["response_tokens"] == 2
    assert compute_attribution(store, head_bv, AttributionConfig(layer=4), progress=False).table.shape[0] == 8
    with pytest.raises(ManifestMismatchError, match="response_tokens"):
        compute_attribution(whole, head_bv, AttributionConfig(layer=4), progress=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="response_tokens"):
            compute_behaviour_vectors(tiny_loaded, _triples(), layers=[1], progress=False, response_tokens=bad)
