"""Options dataclasses as CLI flags and YAML keys; the run config's typed sections; the commands' option groups."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pairtrace.errors import ConfigError
from pairtrace.options import OptionError, OptionGroup, cli_options, from_mapping, load_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BENCHMARK_CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
runner = CliRunner()


@dataclass
class Toy:
    """A small options dataclass."""

    name: str = field(metadata={"help": "The required name."})
    rate: float = field(default=0.5, metadata={"help": "How fast it goes."})
    steps: int = field(default=3, metadata={"help": "How many steps."})

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise OptionError(f"{{rate}} must be positive, got {self.rate}", "rate")


def toy_app(seen: dict) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @cli_options("toy", toy=OptionGroup(Toy, names={"name": "toy-name"}, hidden_aliases={"name": "old-name"},
                                        panel="Toy"))
    def run(out: str = typer.Option("o", help="Where."), toy: Toy = None,
            config: Path = typer.Option(None, "--config")) -> None:
        seen.update(out=out, toy=toy)

    @app.command()
    def other() -> None:  # a second command keeps `run` a named subcommand
        pass

    return app


def test_a_dataclass_becomes_flags_with_its_help_and_defaults():
    seen: dict = {}
    app = toy_app(seen)
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for text in ("--toy-name", "The required name.", "--rate", "How fast it goes.", "--steps", "Toy"):
        assert text in result.output
    assert "--old-name" not in result.output
    result = runner.invoke(app, ["run", "--toy-name", "a", "--steps", "7"])
    assert result.exit_code == 0, result.output
    assert seen == {"out": "o", "toy": Toy(name="a", rate=0.5, steps=7)}
    result = runner.invoke(app, ["run", "--old-name", "b"])  # a hidden alias still works
    assert result.exit_code == 0 and seen["toy"].name == "b"


def test_yaml_keys_fill_options_and_flags_win(tmp_path):
    seen: dict = {}
    app = toy_app(seen)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"toy": {"toy_name": "y", "rate": "2e-1", "steps": 9, "out": "p"}}))
    result = runner.invoke(app, ["run", "--config", str(config), "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert seen == {"out": "p", "toy": Toy(name="y", rate=0.2, steps=4)}


def test_unknown_yaml_keys_missing_and_invalid_options_are_refused(tmp_path):
    app = toy_app({})
    config = tmp_path / "c.yaml"
    config.write_text("speed: 3\n")
    with pytest.raises(ConfigError, match=r"unknown option.*speed"):
        runner.invoke(app, ["run", "--config", str(config), "--toy-name", "a"], catch_exceptions=False)
    with pytest.raises(ConfigError, match=r"missing required option.*--toy-name"):
        runner.invoke(app, ["run"], catch_exceptions=False)
    with pytest.raises(ConfigError, match="--rate must be positive"):
        runner.invoke(app, ["run", "--toy-name", "a", "--rate", "0"], catch_exceptions=False)


def test_from_mapping_names_the_section_and_key():
    assert from_mapping(Toy, {"name": "n", "steps": 2}, "toy") == Toy(name="n", steps=2)
    with pytest.raises(ConfigError, match=r"run config: toy has unknown key\(s\) \['speed'\]"):
        from_mapping(Toy, {"name": "n", "speed": 1}, "toy", "run config")
    with pytest.raises(ConfigError, match=r"toy.rate must be positive"):
        from_mapping(Toy, {"name": "n", "rate": -1}, "toy", "run config")
    with pytest.raises(ConfigError, match=r"missing required option.*toy.name"):
        from_mapping(Toy, {}, "toy")


def test_numbers_written_without_a_dot_are_numbers():
    # YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3'; a number field reads it as the number it spells
    raw = yaml.safe_load("name: n\nrate: 1e-3\nsteps: '4'\n")
    assert raw["rate"] == "1e-3"
    toy = from_mapping(Toy, raw, "toy")
    assert toy.rate == pytest.approx(1e-3) and isinstance(toy.rate, float)
    assert toy.steps == 4 and isinstance(toy.steps, int)
    assert isinstance(from_mapping(Toy, {"name": "n", "rate": 2}, "toy").rate, int)  # ints stay ints: hashes hold


@pytest.mark.parametrize(("value", "message"), [
    ({"rate": "fast"}, r"toy.rate: expected a number, got 'fast'"),
    ({"rate": True}, r"toy.rate: expected a number, got True"),
    ({"steps": 1.5}, r"toy.steps: expected an integer, got 1.5"),
    ({"steps": "1e3"}, r"toy.steps: expected an integer, got '1e3'"),
    ({"steps": [3]}, r"toy.steps: expected an integer, got \[3\]"),
])
def test_values_that_are_not_numbers_are_refused_with_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Toy, {"name": "n", **value}, "toy", "run config")


# ---------------------------------------------------------------------------------------------- run config


def write_config(tmp_path: Path, base: str, **sections) -> Path:
    raw = load_yaml(CONFIGS / base)
    raw["organism"] = str(CONFIGS / raw["organism"])
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("section", "value", "message"), [
    ("validation", {"recipe": {"learning_rte": 1e-3}}, r"validation.recipe has unknown key\(s\) \['learning_rte'\]"),
    ("attribution", {"gradient": {"lora_rank": 4}}, r"attribution.gradient has unknown key\(s\) \['lora_rank'\]"),
    ("extras", {"discover_options": {"linkag": "ward"}}, r"extras.discover_options has unknown key"),
    ("extras", {"steer_options": {"vectr": "probe"}}, r"extras.steer_options has unknown key"),
    ("organism", {"mix": {"n_pair": 10}}, r"organism.*mix: unknown key"),
    ("judge", {"url": "http://x"}, r"judge has unknown key"),
    ("validation", {"dry_run": True}, r"validation has unknown key\(s\) \['dry_run'\]"),
])
def test_unknown_keys_in_typed_sections_are_refused_at_load(tmp_path, section, value, message):
    from pairtrace.experiment.run_config import load_run_config

    if section == "organism":
        organism = load_yaml(CONFIGS / "organism-build.yaml")
        organism["mix"].update(value["mix"])
        value = organism
    with pytest.raises(ConfigError, match=message):
        load_run_config(write_config(tmp_path, "organism-quick.yaml", **{section: value}))


def test_a_learning_rate_written_as_1e_minus_4_is_read_as_a_number(tmp_path):
    from pairtrace.experiment.run_config import load_run_config

    path = write_config(tmp_path, "organism-quick.yaml")
    text = path.read_text().replace("recipe: {}", "recipe:\n    learning_rate: 4e-4\n    epochs: 2")
    assert "4e-4" in text
    path.write_text(text)
    recipe = load_run_config(path).validation.recipe
    assert recipe.learning_rate == pytest.approx(4e-4) and recipe.epochs == 2


def test_openai_judge_needs_url_and_model_named_as_keys(tmp_path):
    from pairtrace.experiment.run_config import load_run_config

    with pytest.raises(ConfigError, match=r"needs judge.base_url and judge.model"):
        load_run_config(write_config(tmp_path, "organism-quick.yaml", judge={"kind": "openai"}))


def old_shared_recipe_fields(raw: dict, base_dir: Path) -> dict:
    """The recipe resolution of the previous release, from the raw YAML."""
    organism = raw.get("organism")
    if isinstance(organism, str):
        organism = load_yaml(base_dir / organism)
    fields = dict((organism or {}).get("dpo", {}))
    fields.update((raw.get("validation") or {}).get("recipe") or {})
    fields.setdefault("seed", raw.get("seed", 0))
    return fields


RUN_CONFIGS = [p for p in [*CONFIGS.glob("*.yaml"), *BENCHMARK_CONFIGS.glob("*.yaml")]
               if {"organism", "models"} & set(load_yaml(p))]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_recipe_resolution_matches_the_previous_semantics(path):
    from pairtrace.experiment.run_config import build_run_config, load_run_config
    from pairtrace.retrain.recipe import DPORecipe

    config = load_run_config(path)
    expected = dataclasses.asdict(DPORecipe(**old_shared_recipe_fields(load_yaml(path), path.parent)))
    assert dataclasses.asdict(config.validation.recipe) == expected
    assert build_run_config(config.to_dict()) == config  # the form worker processes rebuild from


@pytest.mark.parametrize(("organism_dpo", "recipe", "seed", "expected_seed"), [
    ({}, {}, 7, 7), ({"seed": 3}, {}, 7, 3), ({}, {"seed": 5}, 7, 5), ({"seed": 3}, {"seed": 5}, 7, 5),
])
def test_recipe_seed_defaults_to_the_run_seed(tmp_path, organism_dpo, recipe, seed, expected_seed):
    from pairtrace.experiment.run_config import load_run_config

    organism = load_yaml(CONFIGS / "organism-small.yaml")
    organism["dpo"] = {**{k: v for k, v in organism.get("dpo", {}).items() if k != "seed"}, **organism_dpo}
    path = write_config(tmp_path, "organism-quick.yaml", organism=organism, seed=seed,
                        validation={"recipe": {**recipe, "beta": 0.2}})
    config = load_run_config(path)
    assert config.validation.recipe.seed == expected_seed
    assert config.validation.recipe.beta == 0.2


def test_generation_section_is_a_generation_config_with_stage_sampling():
    from pairtrace.experiment.run_config import load_run_config
    from pairtrace.generate import GenerationConfig

    for name, max_new_tokens in (("organism.yaml", 96), ("organism-quick.yaml", 48)):
        g = load_run_config(CONFIGS / name).generation
        assert isinstance(g, GenerationConfig)
        assert (g.temperature, g.top_p, g.max_new_tokens, g.batch_size, g.seed) == (0.7, 0.9, max_new_tokens, 64, 0)
        assert g.sampling(4, 2) == GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens,
                                                    n_samples=4, batch_size=64, seed=2)


def test_steer_options_take_alphas_and_layers_from_extras(tmp_path):
    from pairtrace.experiment.run_config import load_run_config

    config = load_run_config(write_config(tmp_path, "organism-quick.yaml", extras={"steer_layers": [2]}))
    assert config.extras.steer_options.alphas == [0.0, 1.0]
    assert config.extras.steer_options.layers == [2]
    assert config.extras.steer_options.include_last_prompt_token is True
    with pytest.raises(ConfigError, match=r"set the steering alphas as extras.steer_alphas"):
        load_run_config(write_config(tmp_path, "organism-quick.yaml", extras={"steer_options": {"alphas": [3.0]}}))


# ---------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize(("command", "flags"), [
    ("generate", ["--model", "--temperature", "--top-p", "--max-new-tokens", "--samples", "--batch-size", "--seed",
                  "Nucleus sampling threshold"]),
    ("retrain", ["--model", "--loss-type", "--beta", "--sft-weight", "--learning-rate", "--lr-scheduler-type",
                 "--warmup-ratio", "--epochs", "--batch-size", "--seed", "--max-length", "--torch-threads",
                 "DPO beta (deviation penalty"]),
    ("judge", ["--judge", "--judge-url", "--judge-model", "--judge-key-env", "--judge-concurrency",
               "--judge-retries", "--judge-timeout", "--judge-backoff-s", "Most requests in flight at once."]),
    ("discover", ["--model", "--revision", "--dtype", "--device", "--template"]),
    ("steer", ["--model", "--revision", "--dtype", "--device", "--template", "--temperature", "--samples"]),
])
def test_commands_show_the_options_of_their_dataclasses(command, flags):
    from pairtrace.cli import app

    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for flag in flags:
        assert flag in result.output, flag
    assert "--m0" not in result.output


def test_cli_judge_options_are_validated_with_flag_names(tmp_path):
    from pairtrace.cli import app

    result = runner.invoke(app, ["judge", str(tmp_path / "g.jsonl"), "--out", str(tmp_path / "j.jsonl"),
                                 "--judge", "openai"])
    assert result.exit_code == 2
    assert "the openai judge needs --judge-url and --judge-model" in result.output
