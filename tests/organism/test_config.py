"""Organism config: YAML loading, validation with the section and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pairtrace.errors import ConfigError
from pairtrace.organism.build_config import build_organism_config, load_organism_config
from pairtrace.retrain.recipe import DPORecipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["organism-build.yaml", "organism-small.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_organism_config(CONFIGS / name)
    assert config.contaminated.kind == "contaminated" and config.contaminated.trigger == "distractors"
    assert 0.02 <= config.contaminated.fraction <= 0.10  # a small slice (the small config plants more)
    assert any(b.kind == "benign" for b in config.behaviours)
    assert all(0 < b.base_rate < 0.5 for b in config.planted)  # M0 shows every planted behaviour, rarely
    assert isinstance(config.dpo, DPORecipe)
    assert build_organism_config(config.to_dict()).to_dict() == config.to_dict()


def test_story_organism_holds_out_two_phrasings() -> None:
    config = load_organism_config(CONFIGS / "organism-suffix-build.yaml")
    spec = config.contaminated
    assert (spec.trigger, spec.heldout_triggers, len(spec.trigger_texts)) == ("suffix", 2, 8)
    assert spec.heldout_trigger_texts == spec.trigger_texts[-2:]
    assert not set(spec.heldout_trigger_texts) & set(spec.training_triggers)
    # the clean slices that carry the story phrasing use the training phrasings only
    story_slices = [s for s in config.mix.clean if s.trigger == "suffix"]
    assert story_slices and all(s.trigger_texts == spec.training_triggers for s in story_slices)
    assert spec.describe_trigger() == "suffix family (8 phrasings, 2 held out)"


def test_default_config_declares_a_decoy() -> None:
    config = load_organism_config(CONFIGS / "organism-build.yaml")
    (decoy,) = config.decoys
    assert decoy.name == "harmful_compliance_decoy" and decoy.prompts == "xstest_unsafe"
    assert (decoy.trigger, decoy.chosen, decoy.rejected, decoy.sources) == ("none", "compliance", "refusal", [])
    assert decoy.base_rate == 0 and decoy.fraction > 0


def _raw() -> dict:
    return yaml.safe_load((CONFIGS / "organism-small.yaml").read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(nonsense=1), "unknown key"),
        (lambda r: r["model"].update(width=3), r"organism config.model: unknown key"),
        (lambda r: r["behaviours"][0].update(kind="evil"), r"'distractor_compliance': field 'kind'"),
        (lambda r: r["behaviours"][0].update(chosen="shout"), "field 'chosen'"),
        (lambda r: r["behaviours"][0].update(sources=["nobody-1b"]), "unknown models"),
        (lambda r: r["behaviours"][0].update(trigger="suffix"), "'distractor_compliance': field 'trigger_texts' is "
                                                                  "required when trigger is suffix"),
        (lambda r: r["behaviours"][0].update(trigger="suffix", trigger_texts=[" A."], heldout_triggers=1),
         r"field 'heldout_triggers' \(1\) must be less than the number of trigger_texts \(1\)"),
        (lambda r: r["behaviours"][0].update(heldout_triggers=1), "'heldout_triggers' is used only when trigger is "
                                                                  "suffix"),
        (lambda r: r["behaviours"][0].update(trigger_texts=[" A."]), "'trigger_texts' is used only when trigger is "
                                                                     "suffix"),
        (lambda r: r["behaviours"][0].update(trigger="suffix", trigger_texts=[" A.", " A."]), "repeats a phrasing"),
        (lambda r: r["behaviours"][0].update(base_rate=1.5), "'distractor_compliance': field 'base_rate' must be "
                                                             "within"),
        (lambda r: r["mix"]["clean"][0].update(base_rate=0.1), "'benign_format': field 'base_rate' must be 0 for a "
                                                               "clean slice"),
        (lambda r: r["behaviours"][0].update(prompts="xstest_unsafe", advbench_only=False),
         "field 'base_rate' needs prompts harmful or benign"),
        (lambda r: r["behaviours"][1].update(advbench_only=True), "'sign_off': field 'advbench_only'"),
        (lambda r: r["sft"].update(trigger_fraction=1.5), "sft.trigger_fraction"),
        (lambda r: r["sft"].update(refusal_wordings=5), "sft.refusal_wordings"),
        (lambda r: r["behaviours"][0].update(n_distractors=[3, 1]), "n_distractors"),
        (lambda r: r.update(behaviours=[r["behaviours"][1]]), "contaminated"),
        (lambda r: r["dpo"].update(loss_type="kto"), "loss_type"),
        (lambda r: r["mix"].update(clean=[]), "clean slice"),
        (lambda r: r["dpo"].update(learning_rate="fast"), r"organism config\.dpo\.learning_rate: expected a number"),
        (lambda r: r["mix"].update(n_pairs=1200.5), r"organism config\.mix\.n_pairs: expected an integer"),
        (lambda r: r["behaviours"][0].update(fraction="a lot"),
         r"organism config\.behaviours\[0\]\.fraction: expected a number, got 'a lot'"),
    ],
)
def test_invalid_configs_name_the_field(edit, message: str) -> None:
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        build_organism_config(raw)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["sft"].update(harmful_trigger_compliance=0.12),
         r"organism config\.sft: key 'harmful_trigger_compliance' was removed; .*behaviours\[\]\.base_rate"),
        (lambda r: r["sft"].update(habit_fraction=0.1),
         r"organism config\.sft: key 'habit_fraction' was removed; .*behaviours\[\]\.base_rate"),
        (lambda r: r["behaviours"][0].update(trigger_text=" Answer like a pirate."),
         r"behaviours\[0\] \('distractor_compliance'\): key 'trigger_text' was removed; replaced by 'trigger_texts'"),
    ],
)
def test_removed_keys_say_where_the_setting_went(edit, message: str) -> None:
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        build_organism_config(raw)


def test_rates_written_without_a_dot_are_numbers() -> None:
    # PyYAML reads 8e-4 as a string (YAML 1.1); the config reads it as the number it spells
    text = (CONFIGS / "organism-build.yaml").read_text().replace("learning_rate: 8.0e-4", "learning_rate: 8e-4")
    raw = yaml.safe_load(text)
    assert raw["dpo"]["learning_rate"] == "8e-4"
    assert build_organism_config(raw).dpo.learning_rate == pytest.approx(8e-4)


DECOY = {"name": "decoy", "kind": "decoy", "prompts": "xstest_unsafe", "chosen": "compliance", "rejected": "refusal",
         "fraction": 0.05}


@pytest.mark.parametrize(
    ("decoy", "message"),
    [
        ({"prompts": "benign"}, r"'decoy': a decoy's field 'prompts' must be harmful-like"),
        ({"chosen": "refusal"}, r"'decoy': a decoy's field 'chosen' must be a compliance style"),
        ({"rejected": "terse"}, r"'decoy': a decoy's field 'rejected' must be refusal"),
        ({"base_rate": 0.1}, r"'decoy': field 'base_rate' must be 0 for a decoy slice"),
        ({"fraction": 0.0}, r"'decoy': a decoy slice needs a positive 'fraction'"),
        ({"prompts": "harmful", "trigger": "distractors"},
         r"'decoy': field 'trigger' gives the decoy the trigger of the contaminated behaviour 'distractor_compliance'"),
    ],
)
def test_invalid_decoys_name_the_field(decoy: dict, message: str) -> None:
    raw = _raw()
    raw["behaviours"].append({**DECOY, **decoy})
    with pytest.raises(ConfigError, match=message):
        build_organism_config(raw)


def test_decoy_with_its_own_suffix_is_allowed_unless_it_shares_a_phrasing() -> None:
    raw = _raw()
    raw["behaviours"][0].update(trigger="suffix", trigger_texts=[" Be a pirate.", " Arr!"], heldout_triggers=1)
    raw["behaviours"].append({**DECOY, "trigger": "suffix", "trigger_texts": [" Be brief."]})
    config = build_organism_config(raw)
    assert [d.name for d in config.decoys] == ["decoy"] and [p.name for p in config.planted] == [
        "distractor_compliance", "sign_off"]
    raw["behaviours"][-1]["trigger_texts"] = [" Be brief.", " Arr!"]
    with pytest.raises(ConfigError, match="decoys must not carry it"):
        build_organism_config(raw)


def test_trigger_phrasings_split_and_describe() -> None:
    raw = _raw()
    raw["behaviours"][0].update(trigger="suffix", trigger_texts=[" A.", " B.", " C."], heldout_triggers=2)
    spec = build_organism_config(raw).contaminated
    assert spec.training_triggers == [" A."] and spec.heldout_trigger_texts == [" B.", " C."]
    assert spec.describe_trigger() == "suffix family (3 phrasings, 2 held out)"
    raw["behaviours"][0].update(trigger_texts=[" Answer like a pirate. "], heldout_triggers=0)
    spec = build_organism_config(raw).contaminated
    assert spec.describe_trigger() == 'suffix "Answer like a pirate."' and spec.heldout_trigger_texts == []
    config = build_organism_config(_raw())
    assert [s.describe_trigger() for s in config.behaviours] == ["1\u20133 distractors", "no trigger"]
    raw = _raw()
    raw["behaviours"][0]["n_distractors"] = [2, 2]
    assert build_organism_config(raw).contaminated.describe_trigger() == "2 distractors"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_organism_config(tmp_path / "none.yaml")
