"""The moving average of the weights over a DPO run (pairtrace.retrain.weight_average)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pairtrace.errors import ConfigError
from pairtrace.retrain import weight_average
from pairtrace.retrain.weight_average import WeightAverage, add_weight_average


def _step(callback: WeightAverage, model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)
    callback.on_step_end(None, None, None, model=model)


def test_average_is_the_plain_mean_until_the_decay_then_exponential() -> None:
    model = torch.nn.Linear(3, 2, bias=False)
    callback = WeightAverage(0.6)
    _step(callback, model, 1.0)  # step 1: the average starts at the first step's weights
    assert torch.equal(callback.average[0], torch.full((2, 3), 1.0))
    _step(callback, model, 3.0)  # step 2: decay min(0.6, 1/2) -> the mean of 1 and 3
    assert torch.allclose(callback.average[0], torch.full((2, 3), 2.0))
    _step(callback, model, 8.0)  # step 3: decay min(0.6, 2/3) = 0.6 -> 0.6 * 2 + 0.4 * 8
    assert torch.allclose(callback.average[0], torch.full((2, 3), 4.4))
    callback.on_train_end(None, None, None, model=model)
    assert torch.allclose(model.weight, torch.full((2, 3), 4.4)) and callback.average == []


def test_frozen_parameters_are_neither_averaged_nor_written() -> None:
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    bias = model.bias.detach().clone()
    callback = WeightAverage(0.9)
    _step(callback, model, 1.0)
    with torch.no_grad():
        model.bias.add_(5.0)
    _step(callback, model, 2.0)
    callback.on_train_end(None, None, None, model=model)
    assert len(callback.average) == 0 and torch.allclose(model.weight, torch.full((2, 2), 1.5))
    assert torch.allclose(model.bias, bias + 5.0)


def test_no_step_leaves_the_model_as_it_is() -> None:
    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    WeightAverage(0.9).on_train_end(None, None, None, model=model)
    assert torch.equal(model.weight, before)


def test_bad_decay_and_sharded_runs_are_refused() -> None:
    from pairtrace.options import OptionError
    from pairtrace.retrain.recipe import DPORecipe

    for decay in (1.0, -0.1):
        with pytest.raises(OptionError, match="ema_decay"):
            DPORecipe(ema_decay=decay)
    with pytest.raises(ConfigError, match="decay"):
        WeightAverage(0.0)
    added = []
    plain = SimpleNamespace(add_callback=added.append, is_deepspeed_enabled=False, is_fsdp_enabled=False)
    add_weight_average(plain, 0.0)
    assert added == []  # 0 = off
    add_weight_average(plain, 0.9)
    assert isinstance(added[0], WeightAverage)
    for sharded in ("is_deepspeed_enabled", "is_fsdp_enabled"):
        trainer = SimpleNamespace(add_callback=added.append, is_deepspeed_enabled=False, is_fsdp_enabled=False)
        setattr(trainer, sharded, True)
        with pytest.raises(ConfigError, match="DeepSpeed or FSDP"):
            add_weight_average(trainer, 0.9)


def test_dpo_saves_the_average_of_its_steps(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from pairtrace.retrain.recipe import DPORecipe
    from pairtrace.retrain.trl_dpo import train_dpo
    from testing_utils import build_tiny_model_dir

    m0 = build_tiny_model_dir(tmp_path / "m0", n_layers=1, hidden=32)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i} is yes.",
                                         "rejected": "No."}) + "\n" for i in range(12)))
    steps: list[dict[str, torch.Tensor]] = []  # the trainable weights after each optimisation step
    real_step_end = WeightAverage.on_step_end

    def recording_step_end(self, args, state, control, model=None, **kwargs):
        steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return real_step_end(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(weight_average.WeightAverage, "on_step_end", recording_step_end)
    recipe = DPORecipe(batch_size=4, epochs=1, seed=0, learning_rate=1e-2, ema_decay=0.6)
    summary = train_dpo(m0, pairs, tmp_path / "ema", recipe, progress=False)
    last = train_dpo(m0, pairs, tmp_path / "last", DPORecipe(batch_size=4, epochs=1, seed=0, learning_rate=1e-2),
                     progress=False)
    assert summary["steps"] == last["steps"] == len(steps) == 3 and summary["recipe"]["ema_decay"] == 0.6

    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "ema").named_parameters())
    final = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "last").named_parameters())
    moved = 0
    for name, w3 in steps[2].items():
        expected = 0.6 * (0.5 * steps[0][name] + 0.5 * steps[1][name]) + 0.4 * w3
        assert torch.allclose(saved[name], expected, atol=1e-6), name
        assert torch.allclose(final[name], w3, atol=1e-6), name  # without the average: the last step's weights
        moved += not torch.allclose(expected, w3)
    assert moved  # the average is not the last step
