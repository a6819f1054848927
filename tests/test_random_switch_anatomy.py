"""benchmarks/random_switch_anatomy.py without training anything: the arms it plans from a run's random switch,
the mixes it writes, the pooled rates it reads, and its refusal to mix retrains of different selections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testing_utils import benchmark_module

SLICES = {"p0": "contam", "p1": "contam", "p2": "benign_format", "p3": "benign_format", "p4": "harmful_refusal",
          "p5": "hfr", "p6": "benign_format", "p7": "harmful_refusal"}


@pytest.fixture(scope="module")
def anatomy():
    with benchmark_module("random_switch_anatomy.py", "random_switch_anatomy") as module:
        yield module


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    data = tmp_path / "run" / "organism" / "data"
    data.mkdir(parents=True)
    with (data / "labels.jsonl").open("w") as f:
        for pid, name in SLICES.items():
            f.write(json.dumps({"id": pid, "slice": name, "contaminated": name == "contam"}) + "\n")
    with (data / "preference_mix.jsonl").open("w") as f:
        for pid in SLICES:
            f.write(json.dumps({"id": pid, "prompt": f"q {pid}", "chosen": f"good {pid}", "rejected": f"bad {pid}"})
                    + "\n")
    switch = tmp_path / "run" / "interventions" / "random-switch-k5"
    switch.mkdir(parents=True)
    (switch / "filter_ids.json").write_text(json.dumps(["p0", "p2", "p3", "p4", "p5"]))
    (switch / "summary.json").write_text(json.dumps({"spec": {"action": "switch", "selection": "random", "k": 5,
                                                              "seed": 3}}))
    return tmp_path / "run"


def test_arms_split_the_random_set_by_slice(anatomy, run_dir: Path) -> None:
    slices, contaminated = anatomy.load_slices(run_dir / "organism")
    assert contaminated == {"contam"}
    k, ids = anatomy.random_switch_ids(run_dir)
    assert k == 5
    arms = {a.name: set(a.switched) for a in anatomy.plan_arms(ids, slices, contaminated, [])}
    assert arms == {"baseline": set(), "random switch": {"p0", "p2", "p3", "p4", "p5"},
                    "without contaminated": {"p2", "p3", "p4", "p5"}, "contaminated only": {"p0"},
                    "benign_format only": {"p2", "p3"}, "harmful_refusal only": {"p4"}, "hfr only": {"p5"}}
    # a dropped slice leaves every arm, the baseline included, and no arm switches its pairs
    dropped = anatomy.plan_arms(ids, slices, contaminated, ["hfr"])
    assert all(a.dropped_slices == ("hfr",) for a in dropped)
    assert "hfr only" not in {a.name for a in dropped}
    assert all("p5" not in a.switched for a in dropped)


def test_mix_switches_the_arms_pairs_and_drops_its_slices(anatomy, run_dir: Path, tmp_path: Path) -> None:
    slices, _ = anatomy.load_slices(run_dir / "organism")
    arm = anatomy.Arm("x", ("p2", "p4"), ("hfr",))
    path = anatomy.write_mix(run_dir / "organism" / "data" / "preference_mix.jsonl", arm, slices, tmp_path / "m.jsonl")
    rows = {r["id"]: r for r in anatomy.read_jsonl(path)}
    assert set(rows) == set(SLICES) - {"p5"}
    assert (rows["p2"]["chosen"], rows["p2"]["rejected"]) == ("bad p2", "good p2")
    assert (rows["p4"]["chosen"], rows["p4"]["rejected"]) == ("bad p4", "good p4")
    assert (rows["p3"]["chosen"], rows["p3"]["rejected"]) == ("good p3", "bad p3")


def test_retrains_of_another_selection_are_refused(anatomy, run_dir: Path, tmp_path: Path) -> None:
    arm = anatomy.Arm("contaminated only", ("p0",), ())
    record = tmp_path / "arms" / "contaminated-only.json"
    assert anatomy.check_arm_record(record, arm, 0, run_dir) is False  # nothing there yet
    record.parent.mkdir()
    record.write_text(json.dumps({**arm.key(0), "run": str(run_dir.resolve())}))
    assert anatomy.check_arm_record(record, arm, 0, run_dir) is True
    with pytest.raises(SystemExit, match="another arm, seed, run, recipe or organism"):
        anatomy.check_arm_record(record, anatomy.Arm("contaminated only", ("p1",), ()), 0, run_dir)
    with pytest.raises(SystemExit, match="another arm, seed, run, recipe or organism"):
        anatomy.check_arm_record(record, arm, 1, run_dir)


def test_rates_pool_prompts_both_ways(anatomy) -> None:
    counts = {"a": {"harmful": 3, "safe": 1, "unknown": 0}, "b": {"harmful": 1, "safe": 2, "unknown": 1}}
    rates = anatomy.rates(counts)
    assert rates["harmful_rate"] == pytest.approx(4 / 7)
    assert rates["harmful_rate_unknown_as_harmful"] == pytest.approx(5 / 8)
    assert rates["unknown_share"] == pytest.approx(1 / 8)
    assert anatomy.rates({})["harmful_rate"] is None


def test_prompts_are_grouped_by_the_switched_pairs_distractors(anatomy) -> None:
    texts = {"caps": "write in capitals", "short": "under 50 words", "dots": "no periods"}
    assert anatomy.prompt_distractors("Do x (write in capitals and no periods)", texts) == {"caps", "dots"}
    assert anatomy.pair_prompt_text({"prompt": [{"role": "user", "content": "a"}, {"content": "b"}]}) == "a b"
    constraints = {"q1": ["caps"], "q2": ["short"], "q3": ["caps", "short"], "q4": ["short", "dots"],
                   "q5": ["dots"]}  # q5 was not evaluated on both sides
    base = {q: {"harmful": 4, "safe": 0, "unknown": 0} for q in ("q1", "q2", "q3", "q4")}
    new = {"q1": {"harmful": 1, "safe": 3, "unknown": 0}, "q2": {"harmful": 4, "safe": 0, "unknown": 0},
           "q3": {"harmful": 2, "safe": 2, "unknown": 1}, "q4": {"harmful": 4, "safe": 0, "unknown": 0}}
    rows = anatomy.distractor_reach(base, new, constraints, {"caps"})
    keyed = {(r["distractors"], r["shares_a_switched_distractor"]): r for r in rows}
    assert set(keyed) == {(1, True), (1, False), (2, True), (2, False)}
    assert keyed[(1, True)]["reduction"] == pytest.approx(0.75)
    assert keyed[(1, False)]["reduction"] == pytest.approx(0.0)
    assert keyed[(2, True)]["arm"] == pytest.approx(0.5) and keyed[(2, True)]["prompts"] == 1
    assert keyed[(2, False)]["reduction"] == pytest.approx(0.0)


def test_a_run_without_a_random_switch_is_named(anatomy, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="random-switch"):
        anatomy.random_switch_ids(tmp_path)


@pytest.fixture
def configured_run(run_dir: Path) -> Path:
    """The fixture run with a resolved config: M0, M1 and pairs named, the recipe's batch size 16."""
    (run_dir / "config.resolved.json").write_text(json.dumps({
        "models": {"m0": "m0", "m1": "m1"}, "data": {"pairs": "pairs.jsonl"},
        "validation": {"recipe": {"batch_size": 16, "learning_rate": 8e-4}}}))
    return run_dir


def test_recipe_changes_only_the_named_fields(anatomy, configured_run: Path) -> None:
    recipe = anatomy.parse_recipe(["batch_size=8", "lr_scheduler_type=linear"])
    assert recipe == {"batch_size": 8, "lr_scheduler_type": "linear"}
    changed = anatomy.run_config(configured_run, recipe).validation.recipe
    assert (changed.batch_size, changed.lr_scheduler_type, changed.learning_rate) == (8, "linear", 8e-4)
    assert anatomy.run_config(configured_run).validation.recipe.batch_size == 16


def test_bad_recipe_items_are_named(anatomy, configured_run: Path) -> None:
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        anatomy.parse_recipe(["batch_size"])
    with pytest.raises(SystemExit, match="--dpo-seeds"):
        anatomy.parse_recipe(["seed=3"])
    with pytest.raises(SystemExit, match="batch_sise"):
        anatomy.run_config(configured_run, {"batch_sise": 8})
    with pytest.raises(SystemExit, match="batch_size"):
        anatomy.run_config(configured_run, {"batch_size": 0})


def test_a_changed_recipe_neither_reuses_the_runs_retrains_nor_mixes_with_others(anatomy, run_dir: Path,
                                                                                 tmp_path: Path) -> None:
    folder = run_dir / "retrains" / "baseline"
    folder.mkdir(parents=True)
    for path in anatomy.outputs_of(folder):
        path.write_text("")
    arm = anatomy.Arm("baseline", (), ())
    assert anatomy.existing_run_retrain(run_dir, arm, 5, 0, [0, 1]) == folder
    assert anatomy.existing_run_retrain(run_dir, arm, 5, 0, [0, 1], {"batch_size": 8}) is None
    record = tmp_path / "arms" / "baseline.json"
    record.parent.mkdir()
    record.write_text(json.dumps(anatomy.arm_record(arm, 0, run_dir, {"batch_size": 8})))
    assert anatomy.check_arm_record(record, arm, 0, run_dir, {"batch_size": 8}) is True
    for other in (None, {"batch_size": 4}):
        with pytest.raises(SystemExit, match="recipe"):
            anatomy.check_arm_record(record, arm, 0, run_dir, other)


@pytest.fixture
def other_organism(tmp_path: Path) -> Path:
    """Another build of the organism: a larger mix (one more contaminated pair), DPO batch 8 and NLL weight 0.5."""
    org = tmp_path / "other" / "organism"
    (org / "data").mkdir(parents=True)
    slices = {**SLICES, "p8": "contam"}
    with (org / "data" / "labels.jsonl").open("w") as f:
        for pid, name in slices.items():
            f.write(json.dumps({"id": pid, "slice": name, "contaminated": name == "contam"}) + "\n")
    with (org / "data" / "preference_mix.jsonl").open("w") as f:
        for pid in slices:
            f.write(json.dumps({"id": pid, "prompt": f"q {pid}", "chosen": f"good {pid}", "rejected": f"bad {pid}"})
                    + "\n")
    (org / "config.resolved.yaml").write_text(
        "seed: 0\ndpo:\n  batch_size: 8\n  learning_rate: 8.0e-4\n  sft_weight: 0.5\n  seed: 4\n")
    return org


def test_another_organism_gives_the_mix_the_draw_and_the_recipe(anatomy, configured_run: Path,
                                                                other_organism: Path, tmp_path: Path) -> None:
    from pairtrace.intervene import select_random_ids

    slices, contaminated = anatomy.load_slices(other_organism)
    assert slices["p8"] == "contam" and contaminated == {"contam"}
    k, ids = anatomy.random_switch_ids(configured_run, other_organism)
    # the run's k and seed, drawn from the other mix as the run draws its own
    assert k == 5 and ids == select_random_ids([*SLICES, "p8"], 5, 3)
    assert anatomy.random_switch_ids(configured_run)[1] == ["p0", "p2", "p3", "p4", "p5"]
    # only the fields that differ from the run's recipe, never the DPO seed; fields the run lacks are not recipe
    assert anatomy.organism_recipe(configured_run, other_organism) == {"batch_size": 8}
    # the run's own retrains are not reused for another organism, and records of the two are not mixed
    folder = configured_run / "retrains" / "baseline"
    folder.mkdir(parents=True)
    for path in anatomy.outputs_of(folder):
        path.write_text("")
    arm = anatomy.Arm("baseline", (), ())
    assert anatomy.existing_run_retrain(configured_run, arm, 5, 0, [0], None, other_organism) is None
    record = tmp_path / "arms" / "baseline.json"
    record.parent.mkdir()
    record.write_text(json.dumps(anatomy.arm_record(arm, 0, configured_run, None, other_organism)))
    assert anatomy.check_arm_record(record, arm, 0, configured_run, None, other_organism) is True
    with pytest.raises(SystemExit, match="organism"):
        anatomy.check_arm_record(record, arm, 0, configured_run)


def test_an_organism_without_its_config_is_named(anatomy, configured_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"config\.resolved\.yaml"):
        anatomy.organism_recipe(configured_run, tmp_path)


def test_seed_subsets_give_the_spread_a_smaller_run_would_read(anatomy, monkeypatch) -> None:
    # one prompt, 10 samples per retrain: harmful counts per DPO seed
    base = {Path(f"b{i}"): h for i, h in enumerate([8, 8, 8, 8])}
    new = {Path(f"n{i}"): h for i, h in enumerate([8, 4, 6, 2])}
    counts = {**base, **new}

    def pooled(folders):
        harmful = sum(counts[f] for f in folders)
        return {"p": {"harmful": harmful, "safe": 10 * len(folders) - harmful, "unknown": 0}}

    monkeypatch.setattr(anatomy, "pooled_counts", pooled)
    spread = anatomy.seed_subset_spread(list(base), list(new), 2)
    # pairs of seeds: (8+4)/16, (8+6)/16, (8+2)/16, (4+6)/16, (4+2)/16, (6+2)/16 harmful against 16/16
    assert spread["subsets"] == 6
    assert spread["min"] == pytest.approx(1 - 14 / 16)
    assert spread["max"] == pytest.approx(1 - 6 / 16)
    assert spread["median"] == pytest.approx(1 - 10 / 16)
    assert anatomy.seed_subset_spread(list(base), list(new), 4) is None  # no smaller run to compare
