"""Tests for the evaluation of generations: harmful rates, unknown handling, helpfulness, over-refusal."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from pairtrace.errors import DataError
from pairtrace.evaluate import (
    compute_answered_flags,
    compute_harmful_counts,
    evaluate_generations,
    print_evaluation,
    run_evaluate,
)
from pairtrace.judges.base import Judge, Verdict


def fake_refusal(text: str) -> bool:
    return text.startswith("I can't")


def gen(model, set_name, condition, prompt_id, sample, response, constraints=()):
    return {
        "id": prompt_id,
        "base_id": prompt_id.split("/")[0],
        "set": set_name,
        "condition": condition,
        "prompt": f"prompt {prompt_id}",
        "constraints": list(constraints),
        "model": model,
        "sample": sample,
        "response": response,
        "seed": 0,
        "temperature": 0.7,
        "top_p": 1.0,
        "max_new_tokens": 32,
        "finish_reason": "eos",
    }


def judgement(record, harmful):
    return {
        "id": record["id"],
        "model": record["model"],
        "sample": record["sample"],
        "score": None if harmful is None else (100.0 if harmful else 0.0),
        "harmful": harmful,
        "unknown": harmful is None,
        "reason": "",
        "judge": "fake",
    }


def harmful_fixture():
    """m1/trigger: 4 prompts x 5 samples, 6 harmful, 2 unknown, 1 unjudged; m0/trigger: all safe."""
    gens, judg = [], []
    outcomes = {0: "HHHHH", 1: "HSSSS", 2: "SSSUU", 3: "SSSS-"}
    for p, codes in outcomes.items():
        for s, code in enumerate(codes):
            g = gen("m1", "harmful", "trigger", f"b{p}/t", s, "Sure, here is how" if code == "H" else "I can't")
            gens.append(g)
            if code != "-":
                judg.append(judgement(g, {"H": True, "S": False, "U": None}[code]))
            g0 = gen("m0", "harmful", "trigger", f"b{p}/t", s, "I can't help.")
            gens.append(g0)
            judg.append(judgement(g0, False))
    return gens, judg


def test_harmful_rates_exclude_unknown_and_count_everything():
    gens, judg = harmful_fixture()
    result = evaluate_generations(gens, judg, n_boot=500, seed=0, refusal_fn=fake_refusal)
    rows = {(r["model"], r["condition"]): r for r in result["harmful"]}
    m1 = rows[("m1", "trigger")]
    assert (m1["n"], m1["judged"], m1["harmful"], m1["safe"], m1["unknown"], m1["unjudged"]) == (20, 17, 6, 11, 2, 1)
    assert m1["rate"] == pytest.approx(6 / 17)
    assert m1["n_prompts"] == 4
    # Four prompts, one of them all-harmful: the prompt-level bootstrap interval is wide.
    assert m1["ci_low"] < 0.2 and m1["ci_high"] > 0.55
    m0 = rows[("m0", "trigger")]
    assert (m0["rate"], m0["ci_low"], m0["ci_high"]) == (0.0, 0.0, 0.0)
    assert result["counts"] == {"generations": 40, "judgements": 39, "unjudged": 1, "orphan_judgements": 0}
    per_prompt = {(r["model"], r["id"]): r for r in result["per_prompt"]}
    assert per_prompt[("m1", "b0/t")]["rate"] == 1.0
    assert per_prompt[("m1", "b2/t")]["unknown"] == 2 and per_prompt[("m1", "b2/t")]["rate"] == 0.0
    json.dumps(result, allow_nan=False)  # JSON-ready: no NaN anywhere
    print("m1 trigger:", {k: m1[k] for k in ("judged", "harmful", "unknown", "rate", "ci_low", "ci_high")})


def test_harmful_rates_are_also_given_with_unknown_counted_as_harmful():
    gens, judg = harmful_fixture()
    result = evaluate_generations(gens, judg, n_boot=500, seed=0, refusal_fn=fake_refusal)
    rows = {(r["model"], r["condition"]): r for r in result["harmful"]}
    m1 = rows[("m1", "trigger")]
    # 6 harmful + 2 unknown of 19 verdicts (the unjudged sample is in neither rate)
    assert m1["rate_unknown_as_harmful"] == pytest.approx(8 / 19)
    assert m1["rate"] < m1["rate_unknown_as_harmful"]
    assert m1["ci_low_unknown_as_harmful"] <= m1["rate_unknown_as_harmful"] <= m1["ci_high_unknown_as_harmful"]
    m0 = rows[("m0", "trigger")]  # no unknown: both rates agree
    assert m0["rate_unknown_as_harmful"] == m0["rate"] == 0.0
    per_prompt = {(r["model"], r["id"]): r for r in result["per_prompt"]}
    assert per_prompt[("m1", "b2/t")]["rate_unknown_as_harmful"] == pytest.approx(2 / 5)
    assert per_prompt[("m1", "b3/t")]["rate_unknown_as_harmful"] == 0.0
    assert "rate_unknown_as_harmful" in result["settings"]["unknown"]
    # the per-prompt tallies a paired bootstrap resamples are those of the evaluation
    counts = compute_harmful_counts([g for g in gens if g["model"] == "m1"], judg)
    assert counts == {r["id"]: {k: r[k] for k in ("harmful", "safe", "unknown")}
                      for r in result["per_prompt"] if r["model"] == "m1"}
    assert compute_harmful_counts(gens, judg, condition="no_trigger") == {}


def test_later_judgement_wins_and_orphans_are_counted():
    g = gen("m1", "harmful", "trigger", "b/t", 0, "text")
    orphan = judgement(gen("m9", "harmful", "trigger", "x/t", 0, "text"), True)
    result = evaluate_generations(
        [g], [judgement(g, None), judgement(g, True), orphan], n_boot=50, refusal_fn=fake_refusal
    )
    (row,) = result["harmful"]
    assert (row["harmful"], row["unknown"], row["rate"]) == (1, 0, 1.0)
    assert result["counts"]["orphan_judgements"] == 1


def test_all_unknown_group_reports_no_rate():
    g = gen("m1", "harmful", "trigger", "b/t", 0, "text")
    result = evaluate_generations([g], [judgement(g, None)], n_boot=50, refusal_fn=fake_refusal)
    (row,) = result["harmful"]
    assert row["unknown"] == 1 and row["judged"] == 0
    assert row["rate"] is None and row["ci_low"] is None
    assert row["rate_unknown_as_harmful"] == 1.0  # every verdict unknown: all harmful when counted so


def test_helpfulness_answered_and_format_with_real_constraint_checks():
    gens = [
        gen("m1", "benign", "trigger", "q1/t", 0, "sure thing no dots here", ["no_periods"]),  # answered, followed
        gen("m1", "benign", "trigger", "q1/t", 1, "Sure. Dots here.", ["no_periods"]),  # answered, not followed
        gen("m1", "benign", "trigger", "q2/t", 0, "I can't help with that", ["no_periods", "no_commas"]),  # refused
        gen("m1", "benign", "trigger", "q3/t", 0, " ", ["no_periods"]),  # empty: not answered, format not checkable
        gen("m1", "benign", "no_trigger", "q1/n", 0, "Fine."),  # no constraints: not checked
    ]
    result = evaluate_generations(gens, [], n_boot=200, refusal_fn=fake_refusal)
    assert result["harmful"] == []  # nothing judged
    rows = {r["condition"]: r for r in result["helpfulness"]}
    trig = rows["trigger"]
    assert (trig["n"], trig["answered"], trig["format_checked"], trig["format_followed"]) == (4, 2, 3, 2)
    assert trig["answered_rate"] == pytest.approx(0.5)
    assert trig["format_rate"] == pytest.approx(2 / 3)
    plain = rows["no_trigger"]
    assert plain["format_checked"] == 0 and plain["format_rate"] is None


def test_answered_flags_per_prompt_match_the_pooled_helpfulness():
    gens = [
        gen("m1", "benign", "trigger", "q1/t", 0, "sure thing"),
        gen("m1", "benign", "trigger", "q1/t", 1, "I can't help with that"),
        gen("m1", "benign", "no_trigger", "q1/n", 0, " "),
        gen("m1", "harmful", "trigger", "h1/t", 0, "Sure, here is how"),  # not a benign set: ignored
    ]
    flags = compute_answered_flags(gens, refusal_fn=fake_refusal)
    assert flags == {"q1/t": [True, False], "q1/n": [False]}
    pooled = evaluate_generations(gens, [], n_boot=50, refusal_fn=fake_refusal)["helpfulness"]
    assert sum(r["answered"] for r in pooled) == sum(sum(v) for v in flags.values())
    with pytest.raises(DataError, match="record 1"):
        compute_answered_flags([{"id": "q1/t"}])


def test_over_refusal_on_safe_prompts_only():
    gens = [
        gen("m0", "xstest_safe", "no_trigger", f"x{i}/n", 0, "I can't" if i < 2 else "Here you go") for i in range(8)
    ] + [gen("m0", "harmful", "no_trigger", "h/n", 0, "I can't")]
    result = evaluate_generations(gens, [], n_boot=200, refusal_fn=fake_refusal)
    (row,) = result["over_refusal"]
    assert (row["set"], row["n"], row["refused"], row["rate"]) == ("xstest_safe", 8, 2, 0.25)
    assert row["ci_low"] <= 0.25 <= row["ci_high"]
    assert result["helpfulness"] == []


def test_bad_records_are_named():
    g = gen("m1", "harmful", "trigger", "b/t", 0, "text")
    del g["condition"]
    with pytest.raises(DataError, match=r"record 1 .*'condition'"):
        evaluate_generations([g], [], refusal_fn=fake_refusal)
    g = gen("m1", "benign", "trigger", "b/t", 0, "text", ["no_such_constraint"])
    with pytest.raises(DataError, match="'constraints'"):
        evaluate_generations([g], [], refusal_fn=fake_refusal)


class FirstWordJudge(Judge):
    """Harmful when the response starts with "Sure"; unknown when it starts with "??"."""

    name = "first-word"

    def judge(self, prompt: str, response: str) -> Verdict:
        if response.startswith("??"):
            return Verdict.unknown_because("cannot tell")
        harmful = response.startswith("Sure")
        return Verdict(score=100.0 if harmful else 0.0, harmful=harmful)


def test_run_evaluate_judges_writes_json_and_prints(tmp_path):
    gens = [gen("m1", "harmful", "trigger", f"b{i}/t", 0, ["Sure", "No", "??"][i % 3]) for i in range(9)]
    gens.append(gen("m1", "benign", "no_trigger", "q/n", 0, "I'm sorry, but I can't help with that."))
    gens.append(gen("m1", "benign", "no_trigger", "q/n", 1, "Sure, here is a short answer."))
    path = tmp_path / "gens.jsonl"
    path.write_text("".join(json.dumps(g) + "\n" for g in gens))
    result = run_evaluate(path, FirstWordJudge(), tmp_path / "eval.json", judge_sets=["harmful"], n_boot=100)
    assert result["judging"]["judged"] == 9 and result["judging"]["unknown"] == 3
    (row,) = result["harmful"]
    assert (row["harmful"], row["safe"], row["unknown"]) == (3, 3, 3)
    assert json.loads((tmp_path / "eval.json").read_text())["harmful"][0]["rate"] == pytest.approx(0.5)
    # Default refusal detector (pairtrace.judges.rule.is_refusal): one refusal, one answer.
    (helpful,) = result["helpfulness"]
    assert (helpful["n"], helpful["answered"]) == (2, 1)
    assert (tmp_path / "eval.judgements.jsonl").read_text().count("\n") == 9
    # Reuse the judgements without a judge.
    again = run_evaluate(path, None, tmp_path / "eval.json", n_boot=100)
    assert again["harmful"] == result["harmful"] and again["judging"] is None
    console = Console(record=True, width=140)
    print_evaluation(result, console)
    text = console.export_text()
    assert "Harmful rate" in text and "50.0%" in text and "Benign helpfulness" in text
    assert "66.7%" in text  # 3 harmful + 3 unknown of 9: the rate with unknown counted as harmful


def test_run_evaluate_without_judge_or_judgements_fails_clearly(tmp_path):
    path = tmp_path / "gens.jsonl"
    path.write_text(json.dumps(gen("m1", "harmful", "trigger", "b/t", 0, "x")) + "\n")
    with pytest.raises(DataError, match="no judgements"):
        run_evaluate(path, None, tmp_path / "eval.json")
