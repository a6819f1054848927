"""A CPU rehearsal of the paper's code path (``configs/rehearsal.yaml``, ``benchmarks/rehearsal.py``).

``configs/olmo2-7b.yaml`` takes hub models at pinned revisions, a chat template, bfloat16, an OpenAI-compatible judge
endpoint and multi-process retraining. The rehearsal runs the same paths on the reduced organism's tiny models:

1. build the reduced organism and publish its M0 and M1 into a local Hugging Face cache as hub repositories at a
   pinned revision (read offline, so the hub-id + revision path, snapshot lookup and fingerprinting all run);
2. write the probing and evaluation prompt files and point the config at the organism's pairs and labels;
3. serve the rule judge behind an OpenAI-compatible endpoint on the config's ``judge.base_url``;
4. run the experiment: ``models.dtype: auto`` (bfloat16 on a CPU with AMX), ``template: chat``, retrains with
   the ``accelerate`` engine in 2 processes (gloo);
5. retrain the baseline once more with the ``command`` engine (a user command: ``pairtrace retrain`` in process)
   and compare its weights with the 2-process baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from pairtrace.errors import ConfigError
from pairtrace.records import write_json_atomic, write_jsonl_atomic, write_text_atomic

INPUTS_PREFIX = "runs/rehearsal/inputs"
"""Where ``configs/rehearsal.yaml`` expects the prepared inputs (rewritten to the rehearsal's own folder)."""
TOLERANCE = 1e-3
"""Largest distance accepted between the 2-process (accelerate) and the in-process baseline retrain, relative to how
far the in-process retrain moved from M0 (L2 over every parameter). Their data order and global batch are the same,
so only float reduction order separates them: measured 4e-5 (largest parameter difference 7e-5) after the rehearsal's
50 steps. With ``sft_weight`` > 0 the added NLL term is a token mean per micro-batch, not per global batch: 3.7% on
the same retrain with ``sft_weight: 1.0``, which is why the rehearsal's recipe leaves it at 0."""


def hub_cache_env(hub_dir: Path) -> dict[str, str]:
    """Environment that makes Hugging Face read hub models from ``hub_dir`` only, offline."""
    return {"HF_HUB_CACHE": str(hub_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def publish_to_hub_cache(model_dir: Path, repo_id: str, revision: str, hub_dir: Path) -> Path:
    """Lay a model folder out as a cached hub repository ``repo_id`` at commit ``revision`` (the cache's own
    layout: ``models--org--name/snapshots/<revision>/`` and ``refs/main``).

    Returns:
        The snapshot folder.
    """
    repo = hub_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(model_dir, snapshot)
    write_text_atomic(revision, repo / "refs" / "main")
    return snapshot


def prepare_inputs(config: dict[str, Any], organism_config: Path, inputs: Path, *, progress: bool) -> dict[str, Any]:
    """Build the reduced organism into ``inputs/organism``, publish M0/M1 into ``inputs/hub`` at the config's pinned
    revisions, and write the probing / evaluation prompt files."""
    from pairtrace.experiment.inputs import split_organism_prompts
    from pairtrace.organism.build import build_organism
    from pairtrace.organism.build_config import load_organism_config

    organism = load_organism_config(organism_config)
    summary = build_organism(organism, inputs / "organism", progress=progress)
    models = config["models"]
    for which in ("m0", "m1"):
        if not models.get(f"{which}_revision"):
            raise ConfigError(f"rehearsal config: models.{which}_revision must pin a revision")
        publish_to_hub_cache(inputs / "organism" / which, models[which], models[f"{which}_revision"], inputs / "hub")
    probe, evaluation = split_organism_prompts(inputs / "organism" / "prompts", 0.5, organism.seed)
    write_jsonl_atomic(probe, inputs / "prompts" / "probe.jsonl")
    write_jsonl_atomic(evaluation, inputs / "prompts" / "eval.jsonl")
    return summary


def resolve_config(config_path: Path, inputs: Path, out: Path) -> tuple[dict[str, Any], Path]:
    """The rehearsal config with its input paths pointed at ``inputs``; written to ``out/rehearsal.yaml``."""
    text = config_path.read_text(encoding="utf-8").replace(INPUTS_PREFIX, str(inputs))
    config = yaml.safe_load(text)
    path = write_text_atomic(text, out / "rehearsal.yaml")
    return config, path


def compare_models(a: Path, b: Path, origin: Path) -> dict[str, float]:
    """How far apart two saved models of one architecture are: the largest parameter difference, and the L2 distance
    over every parameter relative to how far ``b`` moved from ``origin`` (the model both were trained from)."""
    from safetensors.torch import load_file

    first, second, start = (load_file(str(p / "model.safetensors")) for p in (a, b, origin))
    if first.keys() != second.keys():
        raise ConfigError(f"{a} and {b} hold different parameters")

    def l2(x: dict, y: dict) -> float:
        return sum(float(((x[k].float() - y[k].float()) ** 2).sum()) for k in x) ** 0.5

    return {"max_parameter_difference": max(float((first[k].float() - second[k].float()).abs().max()) for k in first),
            "relative_distance": l2(first, second) / l2(second, start)}


def retrain_with_command(run_dir: Path, out: Path) -> dict[str, Any]:
    """Retrain the run's baseline data with the ``command`` engine, whose command is ``pairtrace retrain`` in one
    process (what a user's own training script would be), and compare it with the run's 2-process baseline."""
    from pairtrace.models import ModelSpec
    from pairtrace.retrain.engine_options import RetrainEngineOptions
    from pairtrace.retrain.engines import RetrainRequest, get_retrainer, resolve_local_m0
    from pairtrace.retrain.recipe import DPORecipe

    resolved = json.loads((run_dir / "config.resolved.json").read_text(encoding="utf-8"))
    models = resolved["models"]
    recipe = DPORecipe(**resolved["validation"]["recipe"])
    template = (f"{sys.executable} -m pairtrace retrain --model {{m0}} --pairs {{train_file}} --out {{retrain_dir}} "
                "--engine inprocess --seed {seed} --beta {beta} --learning-rate {learning_rate} "
                "--batch-size {batch_size} --epochs {epochs} --max-length {max_length} --loss-type {loss_type} "
                "--sft-weight {sft_weight} --lr-scheduler-type {lr_scheduler_type} --warmup-ratio {warmup_ratio} "
                "--torch-threads 1")
    m0 = resolve_local_m0(ModelSpec(name_or_path=models["m0"], revision=models["m0_revision"]))
    request = RetrainRequest(m0=m0, train_file=Path(resolved["data"]["pairs"]), model_dir=out / "command" / "model",
                             recipe=recipe, progress=False,
                             options=RetrainEngineOptions(engine="command", command=template))
    started = time.perf_counter()
    summary = get_retrainer("command")(request)
    distance = compare_models(run_dir / "retrains" / "baseline" / "model", out / "command" / "model",
                              Path(m0.name_or_path))
    return {"engine": summary.engine, "seconds": round(time.perf_counter() - started, 1), "n_pairs": summary.n_pairs,
            "against_the_accelerate_baseline": distance, "tolerance_relative_distance": TOLERANCE,
            "ok": distance["relative_distance"] <= TOLERANCE}


def run_rehearsal(config_path: str | Path, organism_config: str | Path, out: str | Path, *,
                  progress: bool = False) -> dict[str, Any]:
    """Prepare the inputs, serve the judge, run the experiment, and check the command engine against it.

    Must run in a process whose Hugging Face settings come from :func:`hub_cache_env` (``benchmarks/rehearsal.py``
    sets them before anything imports ``huggingface_hub``).

    Returns:
        The rehearsal summary (also ``OUT/rehearsal.json``): seconds per part, the engine of every stage, the run's
        checks, and the command engine's comparison.
    """
    from pairtrace.experiment.run import run_experiment
    from pairtrace.serve import ServeConfig, start_server

    out = Path(out).resolve()
    inputs = out / "inputs"
    if os.environ.get("HF_HUB_CACHE") != str(inputs / "hub"):
        raise ConfigError(f"run the rehearsal with HF_HUB_CACHE={inputs / 'hub'} and HF_HUB_OFFLINE=1 "
                          "(benchmarks/rehearsal.py sets them)")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    config, resolved_path = resolve_config(Path(config_path), inputs, out)
    prepare_inputs(config, Path(organism_config), inputs, progress=progress)
    timings["prepare"] = time.perf_counter() - started
    endpoint = urlparse(config["judge"]["base_url"])
    base_url, shutdown = start_server(ServeConfig(backend="rule", host=endpoint.hostname, port=endpoint.port))
    try:
        started = time.perf_counter()
        results = run_experiment(resolved_path, out / "run", progress=progress)
        timings["run"] = time.perf_counter() - started
    finally:
        shutdown()
    started = time.perf_counter()
    command = retrain_with_command(out / "run", out)
    timings["command_retrain"] = time.perf_counter() - started
    summary = {
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_minutes": round(sum(timings.values()) / 60, 2),
        "judge_endpoint": base_url,
        "engines": results.get("engines"),
        "models": {k: results["config"]["models"][k] for k in ("m0", "m0_revision", "dtype", "template")},
        "checks": results.get("checks"),
        "command_engine": command,
    }
    write_json_atomic(summary, out / "rehearsal.json")
    return summary
