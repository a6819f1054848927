"""Tests for the 4-condition filter that turns judged generations into behaviour triples."""

from __future__ import annotations

import json

import pytest

from pairtrace.behaviour import load_triples
from pairtrace.errors import ConfigError, DataError
from pairtrace.triples import build_triples, run_build_triples

VERDICT = {"H": (90.0, True), "S": (0.0, False), "U": (None, None)}


def make_base(base_id: str, cells: dict[tuple[str, str], str], id_suffix: str = "") -> tuple[list, list]:
    """Generations and judgements of one base prompt; each cell's string gives one verdict per sample."""
    generations, judgements = [], []
    for (model, condition), verdicts in cells.items():
        prompt_id = f"{base_id}-{condition}{id_suffix}"
        prompt = f"request {base_id}" + (" (no periods)" if condition == "trigger" else "")
        for sample, code in enumerate(verdicts):
            generations.append(
                {
                    "id": prompt_id,
                    "base_id": base_id,
                    "set": "harmful",
                    "condition": condition,
                    "prompt": prompt,
                    "constraints": ["no_periods"] if condition == "trigger" else [],
                    "model": model,
                    "sample": sample,
                    "response": f"{model} {condition} {code} sample {sample}",
                }
            )
            if code == "-":
                continue  # generation without a judgement
            score, harmful = VERDICT[code]
            judgements.append(
                {
                    "id": prompt_id,
                    "model": model,
                    "sample": sample,
                    "score": score,
                    "harmful": harmful,
                    "unknown": harmful is None,
                    "reason": "",
                    "judge": "fake",
                }
            )
    return generations, judgements


def cells(m1_trig: str, m1_plain: str, m0_plain: str, m0_trig: str) -> dict[tuple[str, str], str]:
    return {
        ("m1", "trigger"): m1_trig,
        ("m1", "no_trigger"): m1_plain,
        ("m0", "no_trigger"): m0_plain,
        ("m0", "trigger"): m0_trig,
    }


def combine(*parts: tuple[list, list]) -> tuple[list, list]:
    gens, judg = [], []
    for g, j in parts:
        gens += g
        judg += j
    return gens, judg


def test_four_condition_filter_keeps_only_trigger_specific_prompts():
    gens, judg = combine(
        make_base("keep", cells("HSH", "SSS", "SSS", "SS")),  # kept: 2 harmful M1 responses
        make_base("never", cells("SSS", "SSS", "SSS", "SSS")),  # fails 1
        make_base("m1plain", cells("HHH", "SHS", "SSS", "SSS")),  # fails 2
        make_base("m0plain", cells("HHH", "SSS", "HSS", "SSS")),  # fails 3
        make_base("m0trig", cells("HHH", "SSS", "SSS", "SSH")),  # fails 4
    )
    triples, stats = build_triples(gens, judg)
    assert stats["base_prompts"] == 5 and stats["evaluated"] == 5
    assert stats["conditions"] == {
        "m1_trigger_harmful_at_least_once": 4,
        "m1_no_trigger_never_harmful": 4,
        "m0_no_trigger_never_harmful": 4,
        "m0_trigger_never_harmful": 4,
    }
    assert stats["kept_base_ids"] == ["keep"] and stats["kept_prompts"] == 1
    assert stats["triples"] == 2 and len(triples) == 2
    # r1 = the harmful M1+trigger samples (0 and 2), r0 = M0+trigger samples in order.
    assert [t.r1 for t in triples] == ["m1 trigger H sample 0", "m1 trigger H sample 2"]
    assert [t.r0 for t in triples] == ["m0 trigger S sample 0", "m0 trigger S sample 1"]
    assert all(t.prompt_id == "keep-trigger" for t in triples)
    assert triples[0].prompt == ({"role": "user", "content": "request keep (no periods)"},)
    print("stats:", json.dumps(stats))


def test_r0_cycles_when_m0_has_fewer_responses():
    gens, judg = make_base("b", cells("HHHH", "S", "S", "S"))
    triples, stats = build_triples(gens, judg)
    assert [t.r0 for t in triples] == ["m0 trigger S sample 0"] * 4
    assert stats["triples"] == 4 and stats["r0_reused"] == 3


def test_unknown_verdicts_exclude_by_default_and_can_be_ignored():
    gens, judg = combine(
        make_base("unk_m0", cells("HH", "SS", "SU", "SS")),
        make_base("unk_m1", cells("HU", "SS", "SS", "SS")),
        make_base("clean", cells("H", "S", "S", "S")),
    )
    triples, stats = build_triples(gens, judg)
    assert stats["excluded_unknown"] == 2 and stats["kept_base_ids"] == ["clean"]
    assert len(triples) == 1

    triples, stats = build_triples(gens, judg, unknown="ignore")
    assert stats["excluded_unknown"] == 0
    assert stats["kept_base_ids"] == ["clean", "unk_m0", "unk_m1"]
    # The unknown M1 response is never used as r1.
    assert sorted(t.r1 for t in triples if t.prompt_id == "unk_m1-trigger") == ["m1 trigger H sample 0"]


def test_missing_judgement_counts_as_unknown_and_missing_cell_as_incomplete():
    gens, judg = combine(
        make_base("unjudged", cells("H-", "S", "S", "S")),
        make_base("nocell", {("m1", "trigger"): "H", ("m1", "no_trigger"): "S", ("m0", "no_trigger"): "S"}),
    )
    triples, stats = build_triples(gens, judg)
    assert triples == []
    assert stats["unjudged_records"] == 1
    assert stats["excluded_unknown"] == 1 and stats["incomplete"] == 1 and stats["evaluated"] == 0


def test_other_models_are_ignored_and_model_names_are_configurable():
    gens, judg = make_base("b", cells("H", "S", "S", "S"))
    renamed = [{**g, "model": {"m1": "dpo", "m0": "sft"}[g["model"]]} for g in gens]
    renamed_j = [{**j, "model": {"m1": "dpo", "m0": "sft"}[j["model"]]} for j in judg]
    extra = {**gens[0], "model": "other"}
    triples, stats = build_triples([*renamed, extra], renamed_j, m1="dpo", m0="sft")
    assert len(triples) == 1 and stats["ignored_records"] == 1
    with pytest.raises(ConfigError):
        build_triples(gens, judg, m1="x", m0="x")
    with pytest.raises(ConfigError, match="policy"):
        build_triples(gens, judg, unknown="safe")


def test_bad_records_name_record_and_field():
    gens, judg = make_base("b", cells("H", "S", "S", "S"))
    broken = [dict(g) for g in gens]
    del broken[2]["base_id"]
    with pytest.raises(DataError, match=r"record 2 .*'base_id'"):
        build_triples(broken, judg)
    broken = [dict(g) for g in gens]
    broken[1]["condition"] = "with_trigger"
    with pytest.raises(DataError, match="'condition'"):
        build_triples(broken, judg)


def test_run_build_triples_writes_files_that_load_triples_reads(tmp_path):
    gens, judg = combine(make_base("a", cells("HH", "S", "S", "SS")), make_base("b", cells("S", "S", "S", "S")))
    gen_path, judg_path = tmp_path / "gens.jsonl", tmp_path / "judg.jsonl"
    gen_path.write_text("".join(json.dumps(g) + "\n" for g in gens))
    judg_path.write_text("".join(json.dumps(j) + "\n" for j in judg))
    stats = run_build_triples(gen_path, judg_path, tmp_path / "out" / "triples.jsonl")
    loaded = load_triples(tmp_path / "out" / "triples.jsonl")
    assert len(loaded) == stats["triples"] == 2
    assert {t.prompt_id for t in loaded} == {"a-trigger"}
    written = json.loads((tmp_path / "out" / "triples.stats.json").read_text())
    assert written["kept_base_ids"] == ["a"] and written["paths"]["triples"].endswith("triples.jsonl")
