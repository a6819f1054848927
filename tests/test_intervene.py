"""Interventions select by stable id and write the input's own format."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairtrace.attribute import build_ranking
from pairtrace.data.pairs import load_pairs
from pairtrace.errors import ConfigError, ManifestMismatchError
from pairtrace.intervene import InterventionSpec, run_intervention, select_random_ids, switched_record


def olmo_record(i: int) -> dict:
    prompt = f"question number {i}"
    return {
        "id": f"pair-{i}",
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"good answer {i}"}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"bad answer {i}"}],
        "source": "src-a" if i % 2 else "src-b",
        "chosen_model": f"model-{i % 3}",
        "rejected_model": "model-x",
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ranking_for(pairs, scores):
    return build_ranking([p.id for p in pairs], np.asarray(scores, dtype=float),
                         {"method": "probe", "layer": 1, "dataset": {"fingerprint": pairs.fingerprint}})


def test_filter_top_k_removes_exactly_those_ids_whatever_the_row_order(tmp_path):
    records = [olmo_record(i) for i in range(20)]
    src = write_jsonl(tmp_path / "mix.jsonl", records)
    pairs = load_pairs(src)
    scores = [float(i) for i in range(20)]  # pair-19 best
    ranking = ranking_for(pairs, scores)
    summary = run_intervention(src, InterventionSpec(action="filter", k=5), tmp_path / "out", ranking=ranking)
    kept = load_pairs(tmp_path / "out" / "mix.jsonl")
    assert summary["removed"] == 5 and summary["records_out"] == 15
    assert {p.id for p in kept} == {f"pair-{i}" for i in range(15)}
    # a shuffled copy of the dataset with the same ids: the same pairs go
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    src2 = write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    ranking.metadata["dataset"] = {}  # the fingerprint is order-sensitive; ids alone must decide
    summary2 = run_intervention(src2, InterventionSpec(action="filter", k=5), tmp_path / "out2", ranking=ranking)
    assert summary2["selected_ids"] == summary["selected_ids"]
    kept2 = load_pairs(tmp_path / "out2" / "shuffled.jsonl")
    assert {p.id for p in kept2} == {p.id for p in kept}


def test_switch_swaps_text_and_model_metadata_and_keeps_the_layout(tmp_path):
    src = write_jsonl(tmp_path / "mix.jsonl", [olmo_record(i) for i in range(6)])
    pairs = load_pairs(src)
    ranking = ranking_for(pairs, [0, 0, 0, 0, 1, 2])
    summary = run_intervention(src, InterventionSpec(action="switch", k=2), tmp_path / "out", ranking=ranking)
    assert summary["switched"] == 2
    out = [json.loads(line) for line in (tmp_path / "out" / "mix.jsonl").read_text().splitlines()]
    assert len(out) == 6
    for rec in out:
        i = int(rec["id"].split("-")[1])
        assert isinstance(rec["chosen"], list)  # OLMo layout preserved
        if i in (4, 5):
            assert rec["chosen"][-1]["content"] == f"bad answer {i}"
            assert rec["rejected"][-1]["content"] == f"good answer {i}"
            assert rec["chosen_model"] == "model-x" and rec["rejected_model"] == f"model-{i % 3}"
        else:
            assert rec == olmo_record(i)


def test_switched_record_handles_aliases():
    rec = {"chosen": "a", "rejected": "b", "chosen-model": "m1", "rejected-model": "m2", "chosen_rating": 5}
    out = switched_record(rec)
    assert out == {"chosen": "b", "rejected": "a", "chosen-model": "m2", "rejected-model": "m1", "chosen_rating": 5}


def test_parquet_and_saved_dataset_round_trip(tmp_path):
    import datasets

    records = [{"id": f"r{i}", "prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"x{i}",
                "chosen_model": "A" if i < 3 else "B"} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "mix.parquet")
    summary = run_intervention(tmp_path / "mix.parquet", InterventionSpec(action="filter", selection="source",
                                                                          models=["A"]), tmp_path / "o1")
    assert summary["removed"] == 3
    back = pq.read_table(tmp_path / "o1" / "mix.parquet").to_pylist()
    assert [r["id"] for r in back] == [f"r{i}" for i in range(3, 8)]

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    summary = run_intervention(tmp_path / "ds", InterventionSpec(action="switch", selection="random", k=4, seed=1),
                               tmp_path / "o2")
    assert summary["switched"] == 4
    again = load_pairs(tmp_path / "o2" / "ds")
    switched = {p.id for p in again if p.chosen.startswith("x")}
    assert switched == set(summary["selected_ids"])


def test_random_selection_is_seeded_and_order_independent():
    ids = [f"id{i}" for i in range(100)]
    a = select_random_ids(ids, 10, seed=7)
    b = select_random_ids(list(reversed(ids)), 10, seed=7)
    c = select_random_ids(ids, 10, seed=8)
    assert a == b and a != c and len(set(a)) == 10
    with pytest.raises(ConfigError):
        select_random_ids(ids, 101, seed=0)


def test_rankings_from_another_dataset_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "mix.jsonl", [olmo_record(i) for i in range(5)])
    other = write_jsonl(tmp_path / "other.jsonl", [olmo_record(i) for i in range(5, 10)])
    ranking = ranking_for(load_pairs(other), [1, 2, 3, 4, 5])
    with pytest.raises(ManifestMismatchError, match="fingerprint"):
        run_intervention(src, InterventionSpec(action="filter", k=2), tmp_path / "out", ranking=ranking)
    ranking.metadata["dataset"] = {}
    with pytest.raises(ManifestMismatchError, match="not in"):
        run_intervention(src, InterventionSpec(action="filter", k=2), tmp_path / "out", ranking=ranking)
    assert not (tmp_path / "out" / "mix.jsonl").exists()


def test_bad_records_are_copied_and_counted(tmp_path):
    lines = [json.dumps(olmo_record(0)), json.dumps({"id": "broken", "prompt": "p", "chosen": ""}),
             json.dumps(olmo_record(1))]
    src = tmp_path / "mix.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = run_intervention(src, InterventionSpec(action="filter", selection="random", k=1, seed=0),
                               tmp_path / "out")
    assert summary["bad_records_copied"] == 1
    assert summary["records_in"] == 3 and summary["records_out"] == 2


def test_spec_validation():
    with pytest.raises(ConfigError):
        InterventionSpec(action="delete", k=1)
    with pytest.raises(ConfigError):
        InterventionSpec(selection="ranking", k=None)
    with pytest.raises(ConfigError):
        InterventionSpec(selection="source")
    assert InterventionSpec(action="switch", k=30).name == "switch-top30"


def test_intervene_command_by_ranking_random_and_source_with_an_open_instruct_export(tmp_path):
    from typer.testing import CliRunner

    from pairtrace.attribute import save_ranking
    from pairtrace.cli import app

    src = write_jsonl(tmp_path / "mix.jsonl", [olmo_record(i) for i in range(20)])
    pairs = load_pairs(src)
    save_ranking(ranking_for(pairs, [float(i) for i in range(20)]), tmp_path / "ranking")  # pair-19 best
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["intervene", str(src), *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    run("--ranking", tmp_path / "ranking", "--action", "switch", "--k", 3, "--out", tmp_path / "switch")
    switched = {p.id: p for p in load_pairs(tmp_path / "switch" / "mix.jsonl")}
    assert [switched[f"pair-{i}"].chosen for i in (17, 18, 19)] == [f"bad answer {i}" for i in (17, 18, 19)]
    assert switched["pair-16"].chosen == "good answer 16"
    export = [json.loads(line) for line in (tmp_path / "switch" / "open_instruct" / "preference_data.jsonl")
              .read_text().splitlines()]
    assert len(export) == 20 and {r["id"] for r in export} == {f"pair-{i}" for i in range(20)}
    row = next(r for r in export if r["id"] == "pair-19")  # whole conversations, as open-instruct reads them
    assert [m["role"] for m in row["chosen"]] == ["user", "assistant"]
    assert row["chosen"][1]["content"] == "bad answer 19"
    mixer = (tmp_path / "switch" / "open_instruct" / "dataset_mixer_list.txt").read_text()
    assert mixer.startswith("--dataset_mixer_list /") and mixer.strip().endswith("preference_data.jsonl 1.0")

    run("--selection", "random", "--k", 5, "--seed", 1, "--out", tmp_path / "random", "--no-open-instruct")
    assert len(load_pairs(tmp_path / "random" / "mix.jsonl")) == 15
    assert not (tmp_path / "random" / "open_instruct").exists()
    run("--selection", "source", "--models", "model-0", "--out", tmp_path / "source")
    kept = load_pairs(tmp_path / "source" / "mix.jsonl")
    assert len(kept) == 13 and all(p.chosen_model != "model-0" for p in kept)  # 7 of 20 ids are 0 mod 3
    missing = runner.invoke(app, ["intervene", str(src), "--out", str(tmp_path / "x"), "--k", "3"])
    assert missing.exit_code == 2 and "--ranking" in missing.output
