"""The end-to-end experiment: ``pairtrace run CONFIG.yaml``.

    organism ─► probe generations ─► triples ─► behaviour vectors ┐
    pairs ───► datapoint vectors ──────────────────────────────────┴► rankings (probe, bank, gradient, llm_judge,
    random) ─► quality ─► sources ─► plan ─► DPO retrains from M0 ─► evaluation ─► results.json,
    tables.md ─► discovery, steering ─► report.html

Each stage is cached under ``OUT/stages/<name>.json`` with a key chaining its settings, the keys of the stages it
reads and the content digests of the files it reads, so an interrupted run resumes and a changed setting or an
edited input file reruns exactly what depends on it. The same code runs on the built-in organism (CPU, minutes)
and on real checkpoints (``configs/olmo2-7b.yaml``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError
from pairtrace.experiment.checks import compute_checks
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.inputs import resolve_inputs
from pairtrace.experiment.plan import build_plan
from pairtrace.experiment.resources import ResourceOptions
from pairtrace.experiment.results import collect_results, compute_attribution_quality
from pairtrace.experiment.run_config import RunConfig, load_run_config
from pairtrace.experiment.tables import render_tables
from pairtrace.experiment.validation import RetrainQueue, generate_and_judge, resolve_workers, unit_key
from pairtrace.records import read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic
from pairtrace.stage_cache import chain_key, file_digest

logger = logging.getLogger(__name__)


def execute(ctx: RunContext, config_path: str | None = None) -> dict[str, Any]:
    """Run every stage and write ``results.json``, ``tables.md`` and ``report.html``."""
    cfg, cache = ctx.config, ctx.cache
    started = time.perf_counter()
    planned = build_plan(cfg)  # refuse unknown rankers, actions or seeds before any work
    ctx.generation_engine()  # refuse generation.backend: vllm where vLLM cannot run, before any work
    workers = resolve_workers(cfg.validation.parallel_retrains, len(planned.units))
    with RetrainQueue(ctx, workers, reference_cached=organism_filled_reference_cache(cfg)) as queue:
        # the retrains that need no ranking (the baseline, random selections) need only M0, the pairs and the
        # evaluation prompts: with worker processes they start as soon as those exist, beside M1's training
        overlap = cfg.validation.overlap
        inputs = resolve_inputs(ctx, on_retrain_ready=(lambda: submit_unranked(ctx, queue)) if overlap else None)

        # behaviour: M0 and M1 sampled on the probing prompts, judged, turned into (prompt, r1, r0) triples
        probe_key = chain_key(ctx.models_digest(), file_digest(inputs.probe_prompts), ctx.generation_key(),
                              cfg.judge.key_material())
        probe = cache.run("probe_generations", probe_key, lambda: generate_and_judge(
            ctx, "probe", ["m0", "m1"], inputs.probe_prompts, cfg.generation.probe_samples))
        ctx.release("m1")
        triples_key = chain_key(probe_key, cfg.prompts.unknown_policy)
        triples = cache.run("triples", triples_key, lambda: build_triples(ctx, probe))

        # attribution: every ranker over the pairs, and its quality against ground truth where there is one
        rankings_key = chain_key(triples_key, ctx.pairs_digest(), cfg.attribution, cfg.judge.key_material(),
                                 screen_digests(cfg))
        rankings = cache.run("rankings", rankings_key, lambda: rank_pairs(ctx, triples))
        labels = inputs.labels_path()
        quality = cache.run("quality", chain_key(rankings_key, ctx.labels_digest()),
                            lambda: compute_attribution_quality(rankings["rankings"], labels) if labels else {})
        plan = build_plan(cfg, n_pairs=rankings["n_pairs"])
        sources = sources_key = None
        if cfg.extras.sources:
            sources_key = chain_key(rankings_key, plan.headline_k, plan.k_values)
            sources = cache.run("sources", sources_key,
                                lambda: find_sources(ctx, plan.headline_k, list(plan.k_values)))

        # the rest of the plan's retrains from M0, each evaluated on the held-out prompts
        plan = build_plan(cfg, n_pairs=rankings["n_pairs"], source_models=flagged_models(sources))
        keys = {u.name: unit_key(ctx, u, rankings_key, sources_key) for u in plan.units}
        queue.submit(plan.units, keys)

        if not overlap:
            queue.results()  # every retrain finishes before discovery and steering start

        # discovery and steering through the same M0, while the workers retrain
        extras_key = chain_key(rankings_key, probe_key, ctx.labels_digest(), cfg.extras)
        discovery = cache.run("discover", extras_key, lambda: discover(ctx, probe)) if cfg.extras.discover else None
        steer = cache.run("steer", extras_key, lambda: steer_check(ctx, rankings["layer"])) if cfg.extras.steer \
            else None
        finished = queue.results()
    outcomes = {u.name: finished[u.name] for u in plan.units}

    results = collect_results(ctx, plan, rankings, quality, sources, outcomes, discovery, steer, config_path)
    wall_s = None if cache.reused else time.perf_counter() - started  # only a run with nothing cached
    results["checks"] = compute_checks(results, wall_s=wall_s)
    write_json_atomic(results, ctx.path("results.json"))
    write_text_atomic(render_tables(results), ctx.path("tables.md"))
    from pairtrace.report import write_report

    write_report(ctx.out)
    return results


def organism_filled_reference_cache(cfg: RunConfig) -> bool:
    """Whether the organism build's M1 pass leaves M0's reference log-probabilities of every pair of the mix in
    the cache the retrains read: the run's recipe tokenises as the organism's (same ``max_length``) and both
    precompute them."""
    if cfg.organism is None:
        return False
    built, shared = cfg.organism.dpo, cfg.validation.recipe
    return built.precompute_ref_log_probs and shared.precompute_ref_log_probs and built.max_length == shared.max_length


def submit_unranked(ctx: RunContext, queue: RetrainQueue) -> None:
    """Queue the retrains whose pairs no ranking selects: the baseline and the random selections."""
    plan = build_plan(ctx.config, n_pairs=len(ctx.pairs()))
    ready = [u for u in plan.units if u.experiment.selected_by is None]
    queue.submit(ready, {u.name: unit_key(ctx, u, None, None) for u in ready})


def screen_digests(cfg: RunConfig) -> list[str]:
    """Content digests of the screen's example files (they are inputs of the rankings stage)."""
    from pairtrace.screening import parse_example_specs

    return [file_digest(spec.path) for spec in parse_example_specs(cfg.attribution.screen_examples)]


def build_triples(ctx: RunContext, probe: dict[str, str]) -> dict[str, Any]:
    """The triples stage: the paper's 4-condition filter over the probing samples."""
    from pairtrace.triples import run_build_triples

    out = ctx.path("behaviour", "triples.jsonl")
    stats = run_build_triples(probe["generations"], probe["judgements"], out, unknown=ctx.config.prompts.unknown_policy)
    result = {"path": str(out), "n_triples": int(stats.get("n_triples", stats.get("triples", 0))), "stats": stats}
    if not result["n_triples"]:
        raise ConfigError(
            "no (prompt, r1, r0) triple passed the 4-condition filter: M1 never showed the behaviour on the "
            f"probing prompts (stats: {stats})"
        )
    return result


def rank_pairs(ctx: RunContext, triples: dict[str, Any]) -> dict[str, Any]:
    """The rankings stage over the triples stage's file (see :func:`pairtrace.experiment.rankers.compute_rankings`)."""
    from pairtrace.experiment.rankers import compute_rankings
    from pairtrace.vectors import load_triples

    return compute_rankings(ctx, load_triples(triples["path"]))


def find_sources(ctx: RunContext, k: int, k_values: list[int]) -> dict[str, Any]:
    """Source enrichment of the probe's top-k (and across the sweep)."""
    from pairtrace.sources import run_sources

    return run_sources(ctx.path("rankings", "probe"), k, ctx.path("sources"), sweep_ks=k_values)


def flagged_models(sources: dict[str, Any] | None) -> tuple[str, ...]:
    """The chosen models that source enrichment suggests ablating."""
    if not sources:
        return ()
    return tuple((sources.get("ablation") or {}).get("chosen_models") or sources.get("suggested") or [])


def discover(ctx: RunContext, probe: dict[str, str]) -> dict[str, Any]:
    """Unsupervised discovery over the probing samples of M0 and M1, through the run's M0."""
    from pairtrace.discover import run_discover

    records = read_jsonl(probe["generations"])
    paths = {}
    for model in ("m0", "m1"):
        paths[model] = write_jsonl_atomic([r for r in records if r["model"] == model],
                                          ctx.path("discover", f"generations_{model}.jsonl"))
    return run_discover(ctx.model("m0"), ctx.path("vectors"), paths["m0"], paths["m1"], ctx.inputs.pairs,
                        ctx.path("discover"), ctx.config.extras.discover_options,
                        labels_path=ctx.inputs.labels_path(), progress=ctx.progress)


def steer_check(ctx: RunContext, score_layer: int) -> dict[str, Any]:
    """Steering M0 with the probe at the score layer (or the configured layers) on harmful probing prompts."""
    from dataclasses import replace

    from pairtrace.steer import run_steer

    x = ctx.config.extras
    prompts = write_jsonl_atomic([r for r in read_jsonl(ctx.inputs.probe_prompts) if r.get("set") == "harmful"],
                                 ctx.path("steer", "prompts.jsonl"))
    layers = x.steer_layers if x.steer_layers is not None else [score_layer]
    return run_steer(ctx.model("m0"), ctx.path("behaviour"), prompts, ctx.path("steer"),
                     alphas=x.steer_alphas, layers=layers, judge=ctx.judge(),
                     generation_config=ctx.sampling(x.steer_samples, seed_offset=2),
                     config=replace(x.steer_options, alphas=x.steer_alphas, layers=layers), progress=ctx.progress)


def run_experiment(config_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole experiment described by a run config file.

    Args:
        config_path: YAML run configuration (e.g. ``configs/organism.yaml``).
        out_dir: Output directory.
        progress: Show progress bars.

    Returns:
        The content of ``results.json``.
    """
    config = load_run_config(config_path)
    return execute(RunContext(config, out_dir, progress=progress), config_path=str(config_path))


def plan_experiment(config_path: str | Path, resources: ResourceOptions | None = None) -> dict[str, Any]:
    """Validate a run config without running anything, and describe what a run would do and what it needs.

    Args:
        config_path: The run config.
        resources: Assumptions of the resource plan (GPU, utilisation, typical lengths; defaults: an 80 GB H100
            at 40% MFU).

    Returns:
        The plan: inputs, methods, k values (shares of the mix when the data size is not known), the shared DPO
        recipe, the retrains, the DPO seeds, the number of retrains, the generation backend, and the resource plan
        (``resources``: per stage tokens, FLOPs, GPU-hours and peak memory per process; ``resource_plan``: the
        same as text lines).

    Raises:
        ConfigError: An invalid config, or a stage that cannot fit in a GPU's memory (the message holds the
            resource plan and names the fix).
    """
    from dataclasses import asdict

    from pairtrace.experiment.resources import plan_resources, render_resource_plan

    config: RunConfig = load_run_config(config_path)
    plan = build_plan(config)
    if config.organism is None:
        from pairtrace.models import ModelSpec

        for which in ("m0", "m1"):
            ModelSpec(name_or_path=getattr(config.models, which), revision=getattr(config.models, f"{which}_revision"),
                      dtype=config.models.dtype, device=config.models.device, chat_template=config.models.template)
    needs = plan_resources(config, resources)
    text = render_resource_plan(needs)
    if needs.refusals:
        raise ConfigError(f"{config_path}: the run cannot fit as configured.\n{text}")
    return {
        "inputs": {"organism": config.organism is not None, "m0": config.models.m0, "m1": config.models.m1,
                   "pairs": config.data.pairs, "pairs_revision": config.data.revision},
        "attribution": {"layers": config.attribution.layers, "methods": config.attribution.methods,
                        "gradient": asdict(config.attribution.gradient)},
        "recipe": asdict(config.validation.recipe),
        "retrain_engine": config.validation.retrain_engine,
        "generation_backend": config.generation.backend,
        "judge": config.judge.kind,
        **plan.describe(),
        "resources": needs.to_dict(),
        "resource_plan": text.splitlines(),
    }
