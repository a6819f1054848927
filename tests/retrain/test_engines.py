"""Retrain engines: the accelerate engine (2 CPU processes, gloo) trains the same model as the in-process one, the
command engine runs a user template, and the engine options are checked when a config is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.models import ModelSpec
from pairtrace.retrain.accelerate_worker import batch_split
from pairtrace.retrain.engine_options import RetrainEngineOptions
from pairtrace.retrain.engines import RetrainRequest, get_retrainer
from pairtrace.retrain.launch import command_line
from pairtrace.retrain.recipe import DPORecipe

TOLERANCE = 2e-5
"""Largest parameter difference allowed between the 2-process and the in-process retrain (float32, CPU, gloo).
Measured: 3.4e-6 (per-device batch 4, with or without the reference cache), 8.9e-6 (per-device batch 2 x 2
accumulation steps); the same run with another data order (seed 4) differs by 2.4e-3."""

_TOPICS = ["the river", "a small cat", "green tea", "old maps", "the night sky", "bread dough", "a red kite",
           "winter roads"]


def write_pairs(path: Path, n: int) -> Path:
    """``n`` conversational pairs of varied lengths (the mix layout DPO trains on)."""
    lines = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        prompt = [{"role": "user", "content": f"Tell me about {topic}" + " please" * (i % 3)}]
        chosen = f"Here is a short note on {topic}." + " It is calm." * (i % 5)
        rejected = "No." + " I will not." * (i % 4)
        lines.append(json.dumps({"id": f"p{i}", "chosen": [*prompt, {"role": "assistant", "content": chosen}],
                                 "rejected": [*prompt, {"role": "assistant", "content": rejected}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _request(tiny_model_dir: Path, pairs: Path, out: Path, recipe: DPORecipe, cache: Path | None,
             options: RetrainEngineOptions) -> RetrainRequest:
    return RetrainRequest(m0=ModelSpec(name_or_path=str(tiny_model_dir)), train_file=pairs, model_dir=out / "model",
                          recipe=recipe, ref_cache_dir=cache, progress=False, options=options)


def test_two_cpu_processes_train_the_in_process_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 32)
    # with the weight average: every rank folds the same replicated weights, so the saved models still agree
    recipe = DPORecipe(batch_size=8, learning_rate=5e-4, seed=3, torch_threads=1, max_length=64, ema_decay=0.5)
    cache = tmp_path / "ref-cache"
    inproc = get_retrainer("inprocess")(_request(tiny_model_dir, pairs, tmp_path / "a", recipe, cache,
                                                 RetrainEngineOptions()))
    options = RetrainEngineOptions(engine="accelerate", num_processes=2)
    accel = get_retrainer("accelerate")(_request(tiny_model_dir, pairs, tmp_path / "b", recipe, cache, options))
    assert (tmp_path / "b" / "retrain.log").is_file() and (tmp_path / "b" / "retrain_request.json").is_file()
    assert set(inproc.to_dict()) == set(accel.to_dict())
    assert (inproc.engine, accel.engine) == ("inprocess", "accelerate")
    assert inproc.n_pairs == accel.n_pairs == 32 and inproc.steps == accel.steps == 4
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    m0 = load_file(tiny_model_dir / "model.safetensors")
    assert set(a) == set(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - m0[k]).abs().max()) for k in a)
    print(f"max |inprocess - accelerate x2| = {diff:.3g}; max |inprocess - m0| = {moved:.3g}")
    assert diff <= TOLERANCE < moved
    assert (tmp_path / "b" / "model" / "tokenizer.json").is_file()
    assert accel.train_loss == pytest.approx(inproc.train_loss, abs=1e-4)
    assert not (tmp_path / "b" / "accelerate_work").exists()


def test_a_failing_worker_names_its_log(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    (tmp_path / "empty_m0").mkdir()
    options = RetrainEngineOptions(engine="accelerate", num_processes=1)
    request = _request(tmp_path / "empty_m0", pairs, tmp_path / "r", DPORecipe(batch_size=4), None, options)
    with pytest.raises(PairtraceError, match=r"accelerate retrain failed with exit code \d+; log: .*retrain.log"):
        get_retrainer("accelerate")(request)


def test_batch_split_keeps_the_global_batch() -> None:
    assert batch_split(128, 8, None) == (16, 1)
    assert batch_split(128, 8, 1) == (1, 16)
    assert batch_split(16, 2, 4) == (4, 2)
    with pytest.raises(ConfigError, match="divisible by num_processes"):
        batch_split(10, 4, None)
    with pytest.raises(ConfigError, match="per_device_batch_size 3"):
        batch_split(16, 2, 3)


def test_accelerate_refuses_a_batch_it_cannot_split(tiny_model_dir: Path, tmp_path: Path) -> None:
    options = RetrainEngineOptions(engine="accelerate", num_processes=3)
    request = _request(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "r", DPORecipe(batch_size=16), None, options)
    with pytest.raises(ConfigError, match="batch_size 16 cannot be split over 3 processes"):
        get_retrainer("accelerate")(request)


_TRAINER = """
import json, shutil, sys
from pathlib import Path
m0, train_file, model_dir, seed, mixer = sys.argv[1:6]
if seed == "fail":
    print("out of memory on purpose"); sys.exit(3)
n = sum(1 for line in open(train_file) if line.strip())
assert Path(mixer).is_file()
if seed != "nomodel":
    shutil.copytree(m0, model_dir)
    if seed == "7":
        Path(model_dir, "summary.json").write_text(json.dumps({"n_pairs": n, "steps": 2, "train_loss": 0.5}))
print("trained", n)
"""


def _command_request(tiny_model_dir: Path, tmp_path: Path, seed_arg: str, seed: int = 7,
                     shell: bool = False) -> RetrainRequest:
    script = tmp_path / "train.py"
    script.write_text(_TRAINER)
    pairs = write_pairs(tmp_path / "pairs with space.jsonl", 6)
    template = f"{sys.executable} {script} {{m0}} {{train_file}} {{model_dir}} {seed_arg} {{mixer_list}}"
    options = RetrainEngineOptions(engine="command", command=template, shell=shell)
    return _request(tiny_model_dir, pairs, tmp_path / "run", DPORecipe(seed=seed), None, options)


@pytest.mark.parametrize("shell", [False, True])
def test_command_engine_runs_the_template(tiny_model_dir: Path, tmp_path: Path, shell: bool) -> None:
    summary = get_retrainer("command")(_command_request(tiny_model_dir, tmp_path, "{seed}", shell=shell))
    assert (summary.engine, summary.n_pairs, summary.steps, summary.train_loss) == ("command", 6, 2, 0.5)
    assert "trained 6" in (tmp_path / "run" / "retrain.log").read_text()
    export = tmp_path / "run" / "train" / "open_instruct"
    assert (export / "preference_data.jsonl").is_file() and (export / "dataset_mixer_list.txt").is_file()
    # no summary.json: the pairs are counted here, steps and loss are unknown
    summary = get_retrainer("command")(_command_request(tiny_model_dir, tmp_path, "{seed}", seed=1))
    assert (summary.n_pairs, summary.steps, summary.train_loss) == (6, None, None)


def test_a_failing_command_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PairtraceError, match=r"(?s)exit code 3; log: .*retrain.log.*out of memory on purpose"):
        get_retrainer("command")(_command_request(tiny_model_dir, tmp_path, "fail"))
    with pytest.raises(PairtraceError, match=r"(?s)left no model in .*model.*trained 6"):
        get_retrainer("command")(_command_request(tiny_model_dir, tmp_path, "nomodel"))


def test_every_recipe_placeholder_has_a_value(tiny_model_dir: Path, tmp_path: Path) -> None:
    from pairtrace.retrain.engine_options import COMMAND_PLACEHOLDERS
    from pairtrace.retrain.launch import command_values

    request = _command_request(tiny_model_dir, tmp_path, "{seed}")
    request.recipe.ema_decay = 0.98
    values = command_values(request, None, None)
    assert set(COMMAND_PLACEHOLDERS) <= set(values) and values["ema_decay"] == "0.98"


def test_command_placeholders_are_filled_per_argument() -> None:
    values = {"model_dir": "/out/my model", "beta": "0.1"}
    assert command_line("train --out {model_dir} --beta={beta}", values, shell=False) == [
        "train", "--out", "/out/my model", "--beta=0.1"]
    assert command_line("train --out {model_dir} && echo ok", values, shell=True) == [
        "/bin/sh", "-c", "train --out '/out/my model' && echo ok"]


@pytest.mark.parametrize(("options", "message"), [
    ({"engine": "command", "command": "train {m0} {modeldir}"}, r"unknown placeholder \{modeldir\}"),
    ({"engine": "command"}, "needs validation.retrain.command"),
    ({"engine": "inprocess", "gradient_checkpointing": True}, "gradient_checkpointing is an option of the accel"),
    ({"engine": "accelerate", "command": "x"}, "command is an option of the command engine"),
    ({"engine": "accelerate", "mixed_precision": "fp8"}, "mixed_precision: 'fp8'"),
    ({"engine": "nope"}, r"validation.retrain.engine: unknown retrain engine 'nope'"),
    ({"engine": "accelerate", "workers": 2}, r"validation.retrain has unknown key\(s\) \['workers'\]"),
])
def test_engine_options_are_checked_at_config_load(options: dict, message: str) -> None:
    from pairtrace.experiment.run_config import build_run_config

    raw = {"models": {"m0": "m0", "m1": "m1"}, "data": {"pairs": "p.jsonl"}, "validation": {"retrain": options}}
    with pytest.raises(ConfigError, match=message):
        build_run_config(raw)


def test_engine_options_in_the_run_config_and_its_keys() -> None:
    from pairtrace.experiment.run_config import build_run_config

    raw = {"models": {"m0": "m0", "m1": "m1"}, "data": {"pairs": "p.jsonl"},
           "validation": {"retrain": {"engine": "accelerate", "num_processes": 2}}}
    config = build_run_config(raw)
    assert config.validation.retrain == RetrainEngineOptions(engine="accelerate", num_processes=2)
    assert config.validation.retrain_engine == "accelerate"
    assert build_run_config(config.to_dict()).validation.retrain == config.validation.retrain
    assert RetrainEngineOptions().key_material() == "inprocess"  # in-process retrains keep their cache keys
    assert config.validation.retrain.key_material() != RetrainEngineOptions(
        engine="accelerate", num_processes=4).key_material()


def test_retrain_command_line_takes_the_engine_options(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pairtrace.cli import app

    script = tmp_path / "train.py"
    script.write_text(_TRAINER)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 6)
    (tmp_path / "retrain.yaml").write_text(json.dumps({"retrain": {
        "engine": "command", "seed": 7,
        "command": f"{sys.executable} {script} {{m0}} {{train_file}} {{model_dir}} {{seed}} {{mixer_list}}"}}))
    args = ["retrain", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "out"),
            "--config", str(tmp_path / "retrain.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "(command): 6 pairs, 2 steps" in result.output
    result = CliRunner().invoke(app, [*args, "--engine", "accelerate"])  # the file still names a command
    assert result.exit_code == 2 and "--command is an option of the command engine" in result.output
