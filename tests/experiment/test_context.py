"""The run context loads each model once, with the run's options, and every stage receives that model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pairtrace.behaviour import Triple
from pairtrace.data.pairs import pair_to_record
from pairtrace.data.prompts import build_prompt_record
from pairtrace.experiment import run as run_module
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.inputs import resolve_inputs
from pairtrace.experiment.rankers import compute_rankings
from pairtrace.experiment.run_config import load_run_config
from pairtrace.experiment.validation import generate_and_judge
from testing_utils import build_tiny_model_dir, build_tiny_pairs


@pytest.fixture
def bf16_run(tmp_path: Path, tiny_model_dir: Path, one_torch_thread) -> Path:
    """A run config over a tiny local M0 and M1 (another seed), local pairs and prompts, in bfloat16."""
    m1 = build_tiny_model_dir(tmp_path / "m1", seed=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(pair_to_record(p, "conversational")) + "\n" for p in build_tiny_pairs()))
    prompts = tmp_path / "probe.jsonl"
    records = [build_prompt_record(f"h{i}-{c}", f"h{i}", "harmful", c, f"Tell me how to do thing {i}.")
               for i in range(6) for c in ("trigger", "no_trigger")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "models": {"m0": str(tiny_model_dir), "m1": str(m1), "dtype": "bfloat16", "device": "cpu"},
        "data": {"pairs": str(pairs)},
        "prompts": {"probe": [str(prompts)], "eval": [str(prompts)]},
        "generation": {"max_new_tokens": 8, "probe_samples": 1},
        "attribution": {"methods": ["probe", "bank", "gradient", "random"], "layers": [2],
                        "gradient": {"projection_dim": 16, "warmup_epochs": 1, "max_length": 128}},
        "extras": {"steer_alphas": [0.0, 1.0], "steer_samples": 1,
                   "discover_options": {"n_clusters": 2}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_every_stage_receives_the_bfloat16_m0_loaded_once(bf16_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pairtrace.baselines.gradient as gradient
    import pairtrace.behaviour as behaviour
    import pairtrace.discover as discover
    import pairtrace.generate as generate
    import pairtrace.models as models
    import pairtrace.steer as steer
    import pairtrace.vectors as vectors

    loads: list[str] = []
    received: dict[str, list[Any]] = {}
    real_load = models.load_model

    def counting_load(spec, **overrides):
        loads.append(str(getattr(spec, "name_or_path", spec)))
        return real_load(spec, **overrides)

    monkeypatch.setattr(models, "load_model", counting_load)
    for module, name in ((generate, "generate_responses"), (vectors, "compute_datapoint_vectors"),
                         (behaviour, "compute_behaviour_vectors"), (gradient, "compute_gradient_ranking"),
                         (discover, "run_discover"), (steer, "run_steer")):
        real = getattr(module, name)

        def spy(model, *args, _real=real, _name=name, **kwargs):
            received.setdefault(_name, []).append(model)
            return _real(model, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    ctx = RunContext(load_run_config(bf16_run), tmp_path / "out", progress=False)
    resolve_inputs(ctx)
    probe = generate_and_judge(ctx, "probe", ["m0", "m1"], ctx.inputs.probe_prompts, 1)
    triples = [Triple(prompt=({"role": "user", "content": f"request {i}"},), r1="Sure, here you go.",
                      r0="I can't help with that.", prompt_id=f"p{i}") for i in range(3)]
    rankings = compute_rankings(ctx, triples)
    ctx.release("m1")
    run_module.discover(ctx, probe)
    run_module.steer_check(ctx, rankings["layer"])

    assert ctx.model_loads == ["m0", "m1"] and len(loads) == 2  # M0 once for every stage, M1 once
    m0 = ctx.model("m0")
    assert m0.dtype == torch.bfloat16 and next(m0.model.parameters()).dtype == torch.bfloat16
    assert set(received) == {"generate_responses", "compute_datapoint_vectors", "compute_behaviour_vectors",
                             "compute_gradient_ranking", "run_discover", "run_steer"}
    for name, models_received in received.items():
        for model in models_received:
            assert model.dtype == torch.bfloat16, name
            if name != "generate_responses":
                assert model is m0, name
