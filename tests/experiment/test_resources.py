"""The resource plan of ``pairtrace run CONFIG --dry-run``: shapes from config.json alone, per-stage numbers,
refusals that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pairtrace.errors import ConfigError
from pairtrace.experiment.resources import (
    ResourceOptions,
    TrainingSetup,
    architecture_from_config,
    load_architecture,
    pair_lengths,
    training_memory,
)
from pairtrace.experiment.run import plan_experiment

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("probe generations", "datapoint vectors", "behaviour vectors", "gradient baseline", "retrain",
          "evaluation generations", "discovery", "steering")


def _olmo_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **validation) -> Path:
    monkeypatch.chdir(ROOT)  # the config's prompt files are relative to the repository
    raw = yaml.safe_load((ROOT / "configs" / "olmo2-7b.yaml").read_text(encoding="utf-8"))
    raw["validation"].pop("retrain_engine", None)
    raw["validation"]["retrain"] = validation or {"engine": "inprocess"}
    path = tmp_path / "olmo.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_olmo2_7b_architecture_is_shipped() -> None:
    arch = load_architecture("allenai/OLMo-2-1124-7B-SFT")
    assert (arch.n_layers, arch.hidden, arch.intermediate, arch.n_heads, arch.vocab) == (32, 4096, 11008, 32, 100352)
    assert 7.2e9 < arch.params < 7.4e9  # OLMo 2 7B: 7.3 B parameters
    with pytest.raises(ConfigError, match=r"no config.json for 'someone/unknown-model'.*ResourceOptions"):
        load_architecture("someone/unknown-model")


def test_float32_single_process_dpo_of_7b_is_refused_with_the_fix(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_experiment(_olmo_config(tmp_path, monkeypatch))
    message = str(caught.value)
    for stage in STAGES:
        assert stage in message  # every stage's numbers are printed
    refusal = message.split("REFUSED:")[1]
    assert "retrain (DPO from M0)" in refusal and "inprocess: one process, float32" in refusal
    assert "weights_grads_adam 117" in refusal  # 16 bytes x 7.3 B parameters before activations
    assert "accelerate with DeepSpeed ZeRO-3" in refusal and "gradient_checkpointing true" in refusal


def test_sharded_bf16_checkpointed_retrain_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}))
    path = _olmo_config(tmp_path, monkeypatch, engine="accelerate", num_processes=8, mixed_precision="bf16",
                        gradient_checkpointing=True, per_device_batch_size=1, accelerate_config=str(zero3))
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["attribution"]["gradient"]["grad_batch_size"] = 2
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    plan = plan_experiment(path)
    stages = {s["stage"]: s for s in plan["resources"]["stages"]}
    retrain = stages["retrain (DPO from M0), each"]
    assert retrain["fits"] and retrain["processes"] == 8 and retrain["peak_gb_per_process"] < 72
    assert retrain["memory_gb"]["weights_grads_adam"] == pytest.approx(16 * 7.30e9 / 8 / 1e9, rel=0.01)
    assert all(s["fits"] and s["tokens"] > 0 and s["gpu_hours"] > 0 for s in plan["resources"]["stages"])
    assert any("ASSUMED" in a for a in plan["resources"]["assumptions"])  # hub pairs: typical lengths, said so


def test_organism_plan_is_accepted_and_tiny() -> None:
    plan = plan_experiment(ROOT / "configs" / "organism.yaml")
    resources = plan["resources"]
    assert not resources["refusals"] and resources["total_gpu_hours"] < 0.01
    assert resources["architecture"]["params"] < 5e6
    assert {s["stage"].split(" (")[0].split(",")[0] for s in resources["stages"]} >= {
        "probe generations", "datapoint vectors", "retrain", "evaluation generations", "steering"}
    assert any(line.startswith("datapoint vectors") for line in plan["resource_plan"])


def test_lengths_are_sampled_from_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    record = {"prompt": [{"role": "user", "content": "x" * 40}], "chosen": "y" * 80, "rejected": "z" * 8}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(5)), encoding="utf-8")
    lengths = pair_lengths(str(path), ResourceOptions())
    assert (lengths.n, lengths.prompt, lengths.chosen, lengths.rejected) == (5, 10, 20, 2)
    assert "sampled" in lengths.source


def test_training_memory_shards_states_and_checkpointing_shrinks_activations() -> None:
    arch = architecture_from_config({"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16,
                                     "num_attention_heads": 2, "vocab_size": 10}, "test")
    plain = training_memory(arch, TrainingSetup("accelerate", 4, "none", 2, False, 1, ""), 16)
    zero3 = training_memory(arch, TrainingSetup("accelerate", 4, "zero3", 2, True, 1, ""), 16)
    assert zero3["weights_grads_adam"] == plain["weights_grads_adam"] / 4 == 16 * arch.params / 4
    assert zero3["activations"] < plain["activations"]
