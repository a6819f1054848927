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
    assert isinstance(config.dpo, DPORecipe)
    assert build_organism_config(config.to_dict()).to_dict() == config.to_dict()


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
        (lambda r: r["behaviours"][0].update(trigger="suffix"), "trigger_text"),
        (lambda r: r["behaviours"][0].update(n_distractors=[3, 1]), "n_distractors"),
        (lambda r: r.update(behaviours=[r["behaviours"][1]]), "contaminated"),
        (lambda r: r["dpo"].update(loss_type="hinge"), "loss_type"),
        (lambda r: r["mix"].update(clean=[]), "clean slice"),
    ],
)
def test_invalid_configs_name_the_field(edit, message: str) -> None:
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        build_organism_config(raw)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_organism_config(tmp_path / "none.yaml")
