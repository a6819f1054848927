"""Prompt sources, distractors, held-out splits and prompt records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pairtrace.data.prompts import (
    add_distractors,
    build_prompt_record,
    build_trigger_records,
    load_advbench,
    load_distractors,
    load_ifeval,
    load_prompt_records,
    load_xstest,
    resolve_shared_data_dir,
    save_prompt_records,
    split_heldout,
)
from pairtrace.errors import ConfigError, DataError


def test_sources_load_with_the_documented_counts() -> None:
    advbench = load_advbench()
    assert len(advbench) == 520 and advbench[0].id == "advbench-0001"
    assert all(r.target.startswith("Sure, here") for r in advbench)
    ifeval = load_ifeval()
    assert len(ifeval) == 541 and ifeval[0].id == "ifeval-1000" and ifeval[0].instruction_ids
    assert len(load_xstest()) == 450
    assert len(load_xstest(label="safe")) == 250 and len(load_xstest(label="unsafe")) == 200
    with pytest.raises(ConfigError):
        load_xstest(label="maybe")


def test_distractors_are_appended_with_join_and_wrap() -> None:
    d = load_distractors()
    assert d.join == " and " and d.wrap == " ({})" and len(d.ids) == 13
    text = add_distractors("Write a poem", ["max_50_words", "no_periods"], d)
    assert text == "Write a poem (no more than 50 words and no periods)"
    assert add_distractors("Write a poem", [], d) == "Write a poem"
    with pytest.raises(ConfigError, match="unknown constraint"):
        add_distractors("x", ["nope"], d)


def test_split_is_seeded_disjoint_and_order_free() -> None:
    items = load_advbench()
    train, held = split_heldout(items, 60, seed=3)
    assert len(held) == 60 and len(train) == 460
    assert not {r.id for r in train} & {r.id for r in held}
    again = split_heldout(list(reversed(items)), 60, seed=3)[1]
    assert {r.id for r in again} == {r.id for r in held}
    other = split_heldout(items, 60, seed=4)[1]
    assert {r.id for r in other} != {r.id for r in held}
    bigger = split_heldout(items, 80, seed=3)[1]
    assert {r.id for r in held} <= {r.id for r in bigger}
    assert len(split_heldout(items, 0.1, seed=3)[1]) == 52
    with pytest.raises(ConfigError):
        split_heldout(items, 600, seed=0)


def test_trigger_records_are_linked_by_base_id() -> None:
    d = load_distractors()
    records = build_trigger_records("harmful", [("a1", "Do a thing"), ("a2", "Do another")], random.Random(0), d)
    assert [r["id"] for r in records] == ["a1:trigger", "a1:no_trigger", "a2:trigger", "a2:no_trigger"]
    trig, plain = records[0], records[1]
    assert trig["base_id"] == plain["base_id"] == "a1" and trig["set"] == "harmful"
    assert 1 <= len(trig["constraints"]) <= 3 and plain["constraints"] == []
    assert trig["prompt"] == add_distractors("Do a thing", trig["constraints"], d)
    assert plain["prompt"] == "Do a thing"


def test_records_round_trip_and_bad_records_name_line_and_field(tmp_path: Path) -> None:
    records = [build_prompt_record("x:no_trigger", "x", "benign", "no_trigger", "Hello")]
    path = save_prompt_records(records, tmp_path / "p.jsonl")
    assert load_prompt_records(path) == records
    with pytest.raises(DataError, match="condition"):
        build_prompt_record("y", "y", "benign", "sometimes", "Hello")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "z", "prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 .*field 'base_id'"):
        load_prompt_records(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[0]) + "\n")
    with pytest.raises(DataError, match="repeats"):
        load_prompt_records(dup)


def test_shared_dir_override(tmp_path: Path) -> None:
    assert resolve_shared_data_dir(tmp_path) == tmp_path
    with pytest.raises(ConfigError, match="not found"):
        resolve_shared_data_dir(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not found"):
        load_advbench(tmp_path)
