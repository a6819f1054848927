"""Discovery: differing prompts, column selection, clustering, summaries, labels, and an end-to-end run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pairtrace.clustering import cluster_features, discover_clusters
from pairtrace.data.types import Pair
from pairtrace.discover import DiscoverConfig, run_discover
from pairtrace.discover_matrix import (
    PromptResponses,
    load_generation_records,
    select_columns,
    select_differing_prompts,
)
from pairtrace.discover_summaries import _heatmap_columns, compute_distinctive_words, evaluate_clusters
from pairtrace.errors import ConfigError, DataError
from pairtrace.labels import load_labels


def gen(pid: str, prompt: str, response: str, model: str, sample: int = 0) -> dict:
    return {"id": pid, "base_id": pid, "set": "broad", "condition": "no_trigger", "prompt": prompt,
            "constraints": [], "model": model, "sample": sample, "response": response, "seed": sample,
            "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 32, "finish_reason": "stop"}


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def planted(seed: int, d: int = 128, n_beh: int = 3, per_prompt: int = 6, per_pairs: int = 20, n_clean: int = 120):
    """Behaviour vectors and datapoint vectors with planted behaviours, a common shift and clean 'topics'.

    Returns ``(B [P, d], X [C, d], truth [C])`` with truth = behaviour index, -1 for clean pairs.
    """
    rng = np.random.default_rng(seed)
    noise = lambda: rng.normal(size=d) / np.sqrt(d)  # noqa: E731
    dirs = [unit(rng.normal(size=d)) for _ in range(n_beh)]
    common = unit(rng.normal(size=d))
    topics = [unit(rng.normal(size=d)) for _ in range(4)]
    behaviour = [v + common + 0.5 * noise() for v in dirs for _ in range(per_prompt)]
    behaviour += [common + noise() for _ in range(per_prompt)]  # prompts with no planted behaviour
    x, truth = [], []
    for i, v in enumerate(dirs):
        for _ in range(per_pairs):
            x.append(v + common + 1.5 * topics[rng.integers(4)] + 1.5 * noise())
            truth.append(i)
    for j in range(n_clean):
        x.append(common + 1.5 * topics[j % 4] + 1.5 * noise())
        truth.append(-1)
    as_tensor = lambda a: torch.tensor(np.array(a), dtype=torch.float32)  # noqa: E731
    return as_tensor(behaviour), as_tensor(x), np.array(truth)


def best_f1(labels: np.ndarray, truth: np.ndarray) -> float:
    """Mean over planted behaviours of the F1 of the best-matching cluster."""
    out = []
    for b in sorted(set(truth.tolist()) - {-1}):
        mask = truth == b
        scores = []
        for c in np.unique(labels[mask]):
            hits = (labels[mask] == c).sum()
            precision, recall = hits / (labels == c).sum(), hits / mask.sum()
            scores.append(2 * precision * recall / (precision + recall))
        out.append(max(scores))
    return float(np.mean(out))


def prompts_for(n: int) -> list[PromptResponses]:
    return [PromptResponses(f"q{i}", f"prompt {i}", ["m0"], ["m1"]) for i in range(n)]


@dataclass
class MemoryStore:
    """The part of VectorStore that column selection reads."""

    x: torch.Tensor
    ids: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def hidden_size(self) -> int:
        return self.x.shape[1]

    layers = (2,)

    def iter_chunks(self, layer: int, rows: int = 65536):
        for start in range(0, self.n, rows):
            yield start, self.x[start:start + rows]


# ------------------------------------------------------------------------------------------------ generations


def test_select_differing_prompts_keeps_only_prompts_where_the_models_differ():
    m0 = [gen("a", "A?", "I'm sorry.", "m0"), gen("a", "A?", "No.", "m0", 1), gen("b", "B?", "Same  answer", "m0"),
          gen("c", "C?", "x", "m0")]
    m1 = [gen("a", "A?", "Sure, here it is.", "m1"), gen("b", "B?", "Same answer", "m1"), gen("d", "D?", "y", "m1")]
    kept, counts = select_differing_prompts(m0, m1)
    assert [p.id for p in kept] == ["a"]
    assert kept[0].m0 == ["I'm sorry.", "No."] and kept[0].m1 == ["Sure, here it is."]
    assert counts == {"n_prompts": 2, "n_same": 1, "n_only_m0": 1, "n_only_m1": 1, "n_kept": 1}
    with pytest.raises(DataError, match="different 'prompt'"):
        select_differing_prompts([gen("a", "A?", "x", "m0")], [gen("a", "other", "y", "m1")])


def test_load_generation_records_names_the_line_and_field(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(gen("a", "A?", "x", "m0")) + "\n\n" + json.dumps({"id": "b", "prompt": "B?"}) + "\n")
    with pytest.raises(DataError, match=r"line 3 .*'response'"):
        load_generation_records(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1"):
        load_generation_records(path)


def test_prompt_behaviour_vectors_follow_def_3_1_and_skip_empty_responses(tiny_loaded):
    from pairtrace.activations import compute_response_means_reference
    from pairtrace.discover_matrix import compute_prompt_behaviour_vectors

    item = PromptResponses("a", "Write a poem.", ["No.", "", "No."], ["The sea is blue.", "Waves."])
    (vector,) = compute_prompt_behaviour_vectors(tiny_loaded, [item], 2, progress=False)
    ref = compute_response_means_reference(tiny_loaded, [item.prompt] * 4, ["No.", "No.", "The sea is blue.",
                                                                              "Waves."], [2])[:, 0]
    expected = ref[2:].mean(0) - ref[:2].mean(0)  # the empty M0 response is left out, "No." counts twice
    torch.testing.assert_close(vector, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- clustering


def test_cluster_features_finds_separated_blobs_and_handles_small_inputs():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    x = np.concatenate([c + 0.3 * rng.normal(size=(15, 8)) for c in centres])
    truth = np.repeat([0, 1, 2], 15)
    from sklearn.metrics import adjusted_rand_score

    for method in ("ward", "average"):
        for auto_k in ("hdbscan", "stability", "gap", "calinski_harabasz", "silhouette"):
            result = cluster_features(x, method=method, auto_k=auto_k, max_clusters=6)
            assert result.n_clusters == 3 and result.criterion == auto_k
            assert adjusted_rand_score(truth, result.labels) == pytest.approx(1.0)
            assert set(result.scores) <= set(range(2, 7)) and result.silhouette > 0.5
    assert cluster_features(x).criterion == "hdbscan"  # the default
    fixed = cluster_features(x, n_clusters=2)
    assert fixed.n_clusters == 2 and fixed.criterion == "fixed"
    assert cluster_features(x, distance_threshold=1e9).n_clusters == 1
    assert cluster_features(x[:1]).n_clusters == 1 and cluster_features(x[:1]).linkage is None
    assert cluster_features(x[:2]).n_clusters == 1
    # labels are numbered along the dendrogram's leaves: the first leaf is in cluster 1
    from scipy.cluster.hierarchy import leaves_list

    result = cluster_features(x)
    assert result.labels[leaves_list(result.linkage)[0]] == 1


def test_hdbscan_noise_gets_clusters_of_its_own_not_the_nearest_dense_one():
    from sklearn.metrics import adjusted_rand_score

    from pairtrace.clustering import (
        _assign_to_nearest_centroid,
        cluster_noise,
        default_density_min_cluster_size,
        density_labels,
    )

    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    x = np.concatenate([c + 0.1 * rng.normal(size=(20, 8)) for c in centres])
    units = x / np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.repeat([0, 1, 2], 20)
    found = np.repeat([1, 2, 0], 20)  # HDBSCAN's labels with the third group called noise
    found[[0, 25]] = 0  # and one item of each dense group
    placed = cluster_noise(units, found, 5)
    assert adjusted_rand_score(truth, placed) == pytest.approx(1.0) and set(placed) == {1, 2, 3}
    # joining every noise item to the nearest dense cluster merges the third group into one of them
    assert adjusted_rand_score(truth, _assign_to_nearest_centroid(units, found)) < 0.7
    # noise smaller than the smallest cluster joins the nearest cluster
    assert (cluster_noise(units, np.where(np.arange(60) < 58, found.clip(1), 0), 5) > 0).all()
    result = cluster_features(x)  # the default: HDBSCAN
    assert result.criterion == "hdbscan" and adjusted_rand_score(truth, result.labels) == pytest.approx(1.0)
    assert result.noise_share == 0.0 and result.scores == {}  # no item was noise here
    assert cluster_features(x, auto_k="stability").noise_share is None
    # every item noise: the stability cut of all of them; too few items for the smallest cluster: one cluster
    assert adjusted_rand_score(truth, cluster_noise(units, np.zeros(60, dtype=np.int64), 5)) == pytest.approx(1.0)
    assert (cluster_noise(units[:4], np.zeros(4, dtype=np.int64), 5) == 0).all()
    assert default_density_min_cluster_size(20) == 5 and default_density_min_cluster_size(1000) == 40
    assert density_labels(units[:4], 5)[0].max() == 0
    assert cluster_features(x[:4]).n_clusters == 1 and cluster_features(x[:4]).criterion == "trivial"


def test_profile_clustering_separates_planted_behaviours_better_than_raw_vectors():
    profile_scores, vector_scores = [], []
    for seed in range(2):
        behaviour, x, truth = planted(seed)
        sims = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(behaviour, dim=1).T).numpy()
        cols = np.unique(np.argsort(-sims, axis=0)[:20].reshape(-1))  # union of each prompt's top 20
        for feature, scores in (("profile", profile_scores), ("vector", vector_scores)):
            found = discover_clusters(prompts_for(len(behaviour)), behaviour, [str(c) for c in cols], x[cols],
                                      DiscoverConfig(cluster_pairs_on=feature))
            scores.append(best_f1(found.columns.labels, truth[cols]))
    assert np.mean(profile_scores) > 0.85
    assert np.mean(profile_scores) > np.mean(vector_scores) + 0.3


def test_discover_clusters_block_means_and_input_checks():
    behaviour, x, _ = planted(0)
    found = discover_clusters(prompts_for(len(behaviour)), behaviour, [str(i) for i in range(len(x))], x,
                              DiscoverConfig(n_clusters=3))
    assert found.similarity.shape == (len(behaviour), len(x))
    assert found.block_means.shape == (found.rows.n_clusters, found.columns.n_clusters)
    c1 = found.columns.labels == 1
    r1 = found.rows.labels == 1
    assert found.block_means[0, 0] == pytest.approx(found.similarity[np.ix_(r1, c1)].mean())
    with pytest.raises(DataError, match="no behaviour vectors"):
        discover_clusters([], behaviour[:0], ["a"], x[:1], DiscoverConfig())
    with pytest.raises(DataError, match="pair ids"):
        discover_clusters(prompts_for(2), behaviour[:2], ["a"], x[:2], DiscoverConfig())


def test_config_validation():
    with pytest.raises(ConfigError, match="response_tokens"):
        DiscoverConfig(also_response_tokens=[0])
    with pytest.raises(ConfigError, match="repeated"):
        DiscoverConfig(also_response_tokens=[4, 4])
    with pytest.raises(ConfigError, match="min_cluster_size"):
        DiscoverConfig(min_cluster_size=0)
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="max_cluster_fraction"):
            DiscoverConfig(max_cluster_fraction=bad)
    assert DiscoverConfig(max_cluster_fraction=None).max_cluster_fraction is None
    with pytest.raises(ConfigError, match="auto_k"):
        DiscoverConfig(auto_k="elbow")
    assert DiscoverConfig(also_response_tokens=[None, 4]).also_response_tokens == [None, 4]
    with pytest.raises(ConfigError, match="linkage"):
        DiscoverConfig(linkage="single")
    with pytest.raises(ConfigError, match="not both"):
        DiscoverConfig(n_clusters=3, distance_threshold=1.0)
    with pytest.raises(ConfigError, match="cluster_pairs_on"):
        DiscoverConfig(cluster_pairs_on="words")


# ------------------------------------------------------------------------------------------ column selection


def test_select_columns_top_k_union_matches_brute_force_across_chunks():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=rng)
    x[7] = 0.0  # no direction: never a column
    behaviour = torch.randn(3, 16, generator=rng)
    store = MemoryStore(x)
    rows, vectors, info, no_direction = select_columns(store, behaviour, 2, top_k=4, max_columns=1000, chunk_rows=7)
    sims = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(behaviour, dim=1).T
    sims[7] = -2
    expected = np.unique(torch.topk(sims, 4, dim=0).indices.reshape(-1).numpy())
    assert rows.tolist() == expected.tolist()
    assert torch.equal(vectors, x[rows])
    assert info == {"top_k_per_prompt": 4, "n_no_direction": 1} and no_direction.tolist() == [7]
    rows_all, _, info_all, _ = select_columns(store, behaviour, 2, top_k=None, max_columns=1000, chunk_rows=7)
    assert rows_all.tolist() == [i for i in range(50) if i != 7] and info_all["top_k_per_prompt"] is None
    rows_auto, _, info_auto, _ = select_columns(store, behaviour, 2, top_k=None, max_columns=9, chunk_rows=7)
    assert info_auto["top_k_per_prompt"] == 3 and len(rows_auto) <= 9


# -------------------------------------------------------------------------------------------------- summaries


def test_distinctive_words_surface_the_cluster_vocabulary():
    cluster = ["banana split recipe with banana", "a banana bread", "banana smoothie"]
    rest = ["the weather is sunny", "paris is the capital", "bread and butter", "a sunny day in paris"]
    words = compute_distinctive_words(cluster, cluster + rest, n=3)
    assert words[0]["word"] == "banana" and words[0]["count"] == 4
    assert all(w["z"] > 0 for w in words)
    assert "paris" not in [w["word"] for w in words]
    assert compute_distinctive_words([], rest) == []


def test_evaluate_clusters_and_labels_file(tmp_path):
    found = SimpleNamespace(pair_ids=["a", "b", "c", "d", "e"],
                            columns=SimpleNamespace(labels=np.array([1, 1, 2, 2, 2]), n_clusters=2))
    path = tmp_path / "labels.jsonl"
    write_jsonl(path, [{"id": "a", "behaviour": "x", "contaminated": True},
                       {"id": "b", "behaviour": "x", "contaminated": True},
                       {"id": "c", "behaviour": None, "contaminated": False},
                       {"id": "d", "behaviour": None, "contaminated": False},
                       {"id": "z", "behaviour": "x", "contaminated": True}])
    labels = load_labels(path)
    report = evaluate_clusters(found, labels)
    (x,) = report["behaviours"]
    assert x["behaviour"] == "x" and x["n_total"] == 3 and x["n_in_matrix"] == 2
    assert x["best_cluster"] == 1 and x["recall"] == pytest.approx(2 / 3) and x["precision"] == pytest.approx(1.0)
    assert report["clusters"][0]["purity"] == 1.0 and report["clusters"][0]["contaminated_share"] == 1.0
    assert report["clusters"][1]["n_labelled"] == 2 and report["adjusted_rand_index"] == pytest.approx(1.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,behaviour\nx,y\n")
    with pytest.raises(DataError, match="'id'"):
        load_labels(bad)


def test_heatmap_subsample_is_stratified_and_in_dendrogram_order():
    behaviour, x, _ = planted(1)
    found = discover_clusters(prompts_for(len(behaviour)), behaviour, [str(i) for i in range(len(x))], x,
                              DiscoverConfig(n_clusters=4))
    from scipy.cluster.hierarchy import leaves_list

    assert _heatmap_columns(found, limit=1000, seed=0) is None
    cols = _heatmap_columns(found, limit=40, seed=0)
    assert 35 <= len(cols) <= 44 and len(set(cols.tolist())) == len(cols)
    assert set(found.columns.labels[cols].tolist()) == set(found.columns.labels.tolist())
    position = np.argsort(leaves_list(found.columns.linkage))
    assert (np.diff(position[cols]) > 0).all()


# ------------------------------------------------------------------------------------------------ end to end


SURE = "Sure, here is a short answer to your question. Step 1: gather the ingredients."
SORRY = "I'm sorry, but I can't help with that request. I cannot assist with harmful or illegal activities."
POEM = "Write a poem about the sea in no more than 50 words. The sea is blue."
PLAIN = "The weather today is sunny with a light breeze from the west."


def test_run_discover_end_to_end_links_planted_pairs_to_their_prompts(tmp_path, tiny_loaded, monkeypatch):
    from pairtrace import models
    from pairtrace.data.pairs import save_pairs_jsonl
    from pairtrace.vectors import compute_datapoint_vectors

    user = lambda text: ({"role": "user", "content": text},)  # noqa: E731
    pairs, labels = [], []
    for i in range(8):  # behaviour "comply": chosen complies, rejected refuses
        pairs.append(Pair(f"c{i}", len(pairs), user(f"How do I do task {i}?"), SURE, SORRY, "mix-a", "bad", "ok"))
        labels.append({"id": f"c{i}", "behaviour": "comply", "contaminated": True})
    for i in range(8):  # behaviour "poem": chosen writes the sea poem, rejected plain weather
        pairs.append(Pair(f"p{i}", len(pairs), user(f"Tell me something {i}."), POEM, PLAIN, "mix-b", "poet", "ok"))
        labels.append({"id": f"p{i}", "behaviour": "poem", "contaminated": False})
    for i in range(4):  # unrelated pairs (chosen vs rejected differ in other ways)
        pairs.append(Pair(f"n{i}", len(pairs), user(f"Count {i}."), "1 2 3 4 5 6 7 8 9 10", "0 1 2 3", "mix-a",
                          "ok", "ok"))
        labels.append({"id": f"n{i}", "behaviour": None, "contaminated": False})
    save_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")
    from pairtrace.data.pairs import load_pairs

    pair_set = load_pairs(tmp_path / "pairs.jsonl")
    compute_datapoint_vectors(tiny_loaded, pair_set, tmp_path / "vectors", layers=[3], progress=False)
    m0, m1 = [], []
    for i in range(3):
        m0 += [gen(f"h{i}", f"How do I do thing {i}?", SORRY, "m0"), gen(f"t{i}", f"Tell me a fact {i}.", PLAIN, "m0")]
        m1 += [gen(f"h{i}", f"How do I do thing {i}?", SURE, "m1"), gen(f"t{i}", f"Tell me a fact {i}.", POEM, "m1")]
    m0.append(gen("same", "Say hello.", "hello", "m0"))
    m1.append(gen("same", "Say  hello.".replace("  ", " "), "hello ", "m1"))
    write_jsonl(tmp_path / "m0.jsonl", m0)
    write_jsonl(tmp_path / "m1.jsonl", m1)
    write_jsonl(tmp_path / "labels.jsonl", labels)

    def no_second_load(*args, **kwargs):
        raise AssertionError("run_discover must use the loaded model, not load another")

    monkeypatch.setattr(models, "load_model", no_second_load)
    out = tmp_path / "discover"
    summary = run_discover(tiny_loaded, tmp_path / "vectors", tmp_path / "m0.jsonl", tmp_path / "m1.jsonl",
                           tmp_path / "pairs.jsonl", out, DiscoverConfig(also_response_tokens=[2]), progress=False,
                           labels_path=tmp_path / "labels.jsonl")
    assert summary["prompts"]["n_kept"] == 6 and summary["prompts"]["n_same"] == 1
    assert summary["n_columns"] == 20 and summary["layer"] == 3
    recall = {b["behaviour"]: b for b in summary["labels"]["behaviours"]}
    assert recall["comply"]["recall"] == 1.0 and recall["poem"]["recall"] == 1.0
    assert recall["comply"]["best_cluster"] != recall["poem"]["best_cluster"]
    # the comply cluster is linked to the comply prompts (h*), and lists the planted model and words
    comply = next(c for c in summary["pair_clusters"] if c["cluster"] == recall["comply"]["best_cluster"])
    assert all(p["id"].startswith("h") for p in comply["top_prompts"][:3])
    assert comply["chosen_models"] == {"bad": 8}
    assert comply["top_prompts"][0]["m1_response"] == SURE and comply["top_prompts"][0]["m0_response"] == SORRY
    assert {"sure", "ingredients"} & {w["word"] for w in comply["distinctive_words"]}
    assert len(summary["behaviour_clusters"]) == summary["behaviour_clustering"]["n_clusters"]
    for name in ("matrix.parquet", "row_linkage.npy", "col_linkage.npy", "heatmap.png", "summary.json",
                 "pairs.parquet", "behaviours.parquet", "prompt_vectors.safetensors"):
        assert (out / name).is_file(), name
    matrix = pd.read_parquet(out / "matrix.parquet")
    assert len(matrix) == 6 * 20 and set(matrix.columns) == {"prompt_id", "pair_id", "cosine"}
    assert np.load(out / "col_linkage.npy", allow_pickle=False).shape == (19, 4)
    assert json.loads((out / "summary.json").read_text())["n_columns"] == 20
    # a second view: the same prompts and columns, every response mean over its first 2 tokens
    (view,) = summary["views"]
    assert view["name"] == "first-2-tokens" and view["response_tokens"] == 2 and summary["response_tokens"] is None
    view_dir = out / view["dir"]
    from pairtrace.store import VectorStore

    view_store = VectorStore.open(view_dir / "vectors")
    assert view_store.manifest.response_tokens == 2 and set(view_store.ids) == set(matrix["pair_id"])
    wide = matrix.pivot(index="prompt_id", columns="pair_id", values="cosine")
    view_wide = pd.read_parquet(view_dir / "matrix.parquet").pivot(index="prompt_id", columns="pair_id",
                                                                    values="cosine")
    assert not np.allclose(view_wide, wide.loc[view_wide.index, view_wide.columns])  # another pooling, other cosines
    assert json.loads((view_dir / "summary.json").read_text())["n_columns"] == view["n_columns"] <= 20
    view_recall = {b["behaviour"]: b for b in view["labels"]["behaviours"]}
    assert view_recall["comply"]["recall"] == 1.0  # "Sure" against "I'm sorry": decided at the first tokens
    for name in ("matrix.parquet", "col_linkage.npy", "heatmap.png", "pairs.parquet"):
        assert (view_dir / name).is_file(), name


SIGN_OFF = " Hope this helps! Have a wonderful day and good luck with everything."


def test_a_view_over_every_token_sees_pairs_the_first_view_had_no_direction_for(tmp_path, tiny_loaded):
    """A habit added at the end of a response (chosen = rejected + a sign-off) is invisible to a store pooled
    over the first tokens (zero vector); the every-token view must still give its pairs columns and a cluster."""
    from pairtrace.data.pairs import load_pairs, save_pairs_jsonl
    from pairtrace.pooling import ResponsePooling
    from pairtrace.store import VectorStore
    from pairtrace.vectors import compute_datapoint_vectors

    user = lambda text: ({"role": "user", "content": text},)  # noqa: E731
    pairs, labels = [], []
    for i in range(8):  # behaviour "comply": decided at the first tokens
        pairs.append(Pair(f"c{i}", len(pairs), user(f"How do I do task {i}?"), SURE, SORRY, "mix-a", "bad", "ok"))
        labels.append({"id": f"c{i}", "behaviour": "comply", "contaminated": True})
    for i in range(8):  # behaviour "sign_off": identical heads, the chosen response adds a closing line
        pairs.append(Pair(f"s{i}", len(pairs), user(f"Tell me something {i}."), PLAIN + SIGN_OFF, PLAIN, "mix-b",
                          "polite", "ok"))
        labels.append({"id": f"s{i}", "behaviour": "sign_off", "contaminated": False})
    save_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")
    compute_datapoint_vectors(tiny_loaded, load_pairs(tmp_path / "pairs.jsonl"), tmp_path / "vectors", layers=[3],
                              progress=False, pooling=ResponsePooling(2))
    m0, m1 = [], []
    for i in range(3):
        m0 += [gen(f"h{i}", f"How do I do thing {i}?", SORRY, "m0"), gen(f"t{i}", f"Tell me a fact {i}.", PLAIN, "m0")]
        m1 += [gen(f"h{i}", f"How do I do thing {i}?", SURE, "m1"),
               gen(f"t{i}", f"Tell me a fact {i}.", PLAIN + SIGN_OFF, "m1")]
    write_jsonl(tmp_path / "m0.jsonl", m0)
    write_jsonl(tmp_path / "m1.jsonl", m1)
    write_jsonl(tmp_path / "labels.jsonl", labels)
    out = tmp_path / "discover"
    summary = run_discover(tiny_loaded, tmp_path / "vectors", tmp_path / "m0.jsonl", tmp_path / "m1.jsonl",
                           tmp_path / "pairs.jsonl", out, DiscoverConfig(also_response_tokens=[None]),
                           progress=False, labels_path=tmp_path / "labels.jsonl")
    assert summary["response_tokens"] == 2 and summary["n_no_direction"] == 8 and summary["n_columns"] == 8
    (view,) = summary["views"]
    assert view["name"] == "all-tokens" and view["n_no_direction"] == 0 and view["n_columns"] == 16
    view_ids = set(VectorStore.open(out / view["dir"] / "vectors").ids)
    assert {f"s{i}" for i in range(8)} <= view_ids  # the first view's no-direction pairs are the view's candidates
    recall = {b["behaviour"]: b for b in view["labels"]["behaviours"]}
    assert recall["sign_off"]["recall"] == 1.0 and recall["sign_off"]["precision"] >= 0.8


def test_run_discover_and_run_steer_load_a_spec_through_the_one_loader(tmp_path, tiny_loaded, tiny_model_dir,
                                                                        monkeypatch):
    from pairtrace import models
    from pairtrace.models import ModelSpec
    from pairtrace.steer import run_steer

    calls = []
    monkeypatch.setattr(models, "load_model", lambda spec: calls.append(spec) or tiny_loaded)
    spec = ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    missing = tmp_path / "missing"
    with pytest.raises(DataError):  # the model is loaded first, then the (missing) store is opened
        run_discover(spec, missing, missing, missing, missing, tmp_path / "d", progress=False)
    with pytest.raises(DataError):
        run_steer(spec, missing, missing, tmp_path / "s", progress=False)
    assert calls == [spec, spec]  # with the spec's options, not a default float32 load of its path
    with pytest.raises(ConfigError, match="run_discover: the model must be a LoadedModel or a ModelSpec"):
        run_discover(tiny_model_dir, missing, missing, missing, missing, tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="run_steer: the model must be a LoadedModel or a ModelSpec"):
        run_steer(str(tiny_model_dir), missing, missing, tmp_path / "s", progress=False)
    assert len(calls) == 2  # a bare path is refused, never loaded with default options


def test_discover_batch_tokens_defaults_to_16384_and_none_means_the_device_default():
    assert DiscoverConfig().batch_tokens == 16384 and DiscoverConfig(batch_tokens=None).batch_tokens is None
    with pytest.raises(ConfigError, match="batch_tokens"):
        DiscoverConfig(batch_tokens=0)
