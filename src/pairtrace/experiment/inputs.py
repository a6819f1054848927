"""Resolve a run's inputs: build the organism (a cached stage) or take the configured models, pairs and prompts;
split prompts into a probing share and an evaluation share."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError
from pairtrace.experiment.context import Inputs, RunContext
from pairtrace.records import read_jsonl, write_jsonl_atomic
from pairtrace.stage_cache import settings_digest


def resolve_inputs(ctx: RunContext, on_retrain_ready: Callable[[], None] | None = None) -> Inputs:
    """Build the organism (cached) or take the configured inputs, write the probe/eval prompt files, and set
    ``ctx.inputs``.

    Args:
        ctx: The run context.
        on_retrain_ready: Called once, as soon as a retrain from M0 could start: M0, the pairs and the evaluation
            prompts exist, and so does M0's reference cache when the run builds the organism (before its M1 is
            trained); ``ctx.inputs`` already points at them.
    """
    cfg = ctx.config
    if cfg.organism is not None:
        inputs = _organism_inputs(ctx, on_retrain_ready)
    else:
        if not cfg.prompts.probe or not cfg.prompts.eval:
            raise ConfigError("run config: prompts.probe and prompts.eval are required without an organism")
        inputs = Inputs(
            m0=str(cfg.models.m0), m1=str(cfg.models.m1), m0_revision=cfg.models.m0_revision,
            m1_revision=cfg.models.m1_revision, pairs=str(cfg.data.pairs), split=cfg.data.split,
            pairs_revision=cfg.data.revision, labels=cfg.data.labels,
            probe_prompts=str(concat_prompts(cfg.prompts.probe, ctx.path("prompts", "probe.jsonl"))),
            eval_prompts=str(concat_prompts(cfg.prompts.eval, ctx.path("prompts", "eval.jsonl"))),
            ref_cache=str(ctx.path("cache", "ref_logps")),
        )
        ctx.inputs = inputs
        if on_retrain_ready is not None:
            on_retrain_ready()
    ctx.inputs = inputs
    return inputs


def _organism_inputs(ctx: RunContext, on_retrain_ready: Callable[[], None] | None) -> Inputs:
    from pairtrace.organism.build import REF_CACHE_DIR, build_organism

    org_dir = ctx.path("organism")
    announced: list[bool] = []

    def retrain_ready() -> None:
        """M0, the mix, the prompts and the reference cache exist: split the prompts and point ``ctx.inputs`` at
        them (once)."""
        if announced:
            return
        announced.append(True)
        probe, evaluation = split_organism_prompts(org_dir / "prompts", ctx.config.prompts.probe_share,
                                                   ctx.config.seed)
        write_jsonl_atomic(probe, ctx.path("prompts", "probe.jsonl"))
        write_jsonl_atomic(evaluation, ctx.path("prompts", "eval.jsonl"))
        ctx.inputs = Inputs(
            m0=str(org_dir / "m0"), m1=str(org_dir / "m1"), pairs=str(org_dir / "data" / "preference_mix.jsonl"),
            labels=str(org_dir / "data" / "labels.jsonl"), probe_prompts=str(ctx.path("prompts", "probe.jsonl")),
            eval_prompts=str(ctx.path("prompts", "eval.jsonl")),
            ref_cache=str(org_dir / REF_CACHE_DIR),  # M1's build holds M0's log-probs of every pair
        )
        if on_retrain_ready is not None:
            on_retrain_ready()

    def build() -> dict[str, Any]:
        summary = build_organism(ctx.config.organism, org_dir, progress=ctx.progress,
                                 on_reference_ready=retrain_ready)
        return json.loads(json.dumps(summary, default=str))

    # the build's own stage cache decides what to redo inside it; this stage only records its summary
    summary = ctx.cache.run("organism", settings_digest(ctx.config.organism), build,
                            outputs=[org_dir / "summary.json"])
    retrain_ready()  # an organism built by an earlier run: nothing was announced yet
    return replace(ctx.inputs, organism_summary=summary)


def concat_prompts(files: list[str], out: Path) -> Path:
    """Concatenate prompt record files into one."""
    records: list[dict[str, Any]] = []
    for f in files:
        records.extend(read_jsonl(Path(f)))
    return write_jsonl_atomic(records, out)


def split_organism_prompts(prompt_dir: Path, probe_share: float,
                           seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Held-out harmful/benign base prompts -> a probing share and an evaluation share (by ``base_id``, so a
    request's triggered and untriggered forms stay together); XSTest prompts all evaluate.

    Returns:
        ``(probe records, evaluation records)``.
    """
    probe: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    for path in sorted(prompt_dir.glob("*.jsonl")):
        records = read_jsonl(path)
        bases = sorted({r["base_id"] for r in records})
        if all(r.get("condition") == "no_trigger" for r in records) and path.stem.startswith("xstest"):
            evaluation.extend(records)
            continue
        rng = random.Random(f"probe-split-{seed}-{path.stem}")
        rng.shuffle(bases)
        probe_bases = set(bases[: round(len(bases) * probe_share)])
        for r in records:
            (probe if r["base_id"] in probe_bases else evaluation).append(r)
    return probe, evaluation
