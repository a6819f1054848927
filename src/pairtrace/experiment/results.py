"""The numbers of a run: each retrain's headline rates, experiments pooled over their DPO seeds, reductions against
the baseline, paired helpfulness changes, attribution quality against ground truth, and ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pairtrace import __version__
from pairtrace.environment import describe_hardware, library_versions
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.plan import Plan, RetrainUnit
from pairtrace.records import read_jsonl, write_json_atomic


def summarise_evaluation(evaluation: dict[str, Any], model: str) -> dict[str, Any]:
    """The headline numbers of one model's evaluation: rates, 95% intervals, counts (incl. unknown)."""

    def harmful_row(condition: str) -> dict[str, Any] | None:
        for row in evaluation.get("harmful", []):
            if row["model"] == model and row["set"] == "harmful" and row["condition"] == condition:
                return {"rate": row["rate"], "ci": [row["ci_low"], row["ci_high"]], "n": row["judged"],
                        "unknown": row["unknown"], "harmful": row["harmful"]}
        return None

    def pooled(rows: list[dict[str, Any]], num: str, den: str, prefix: str) -> dict[str, Any] | None:
        rows = [r for r in rows if r["model"] == model]
        if not rows:
            return None
        n = sum(r[den] for r in rows)
        if not n:
            return None
        # the interval of the pooled rate: the widest of the per-condition intervals (conservative)
        lows = [r[f"{prefix}ci_low"] for r in rows if r.get(f"{prefix}ci_low") is not None]
        highs = [r[f"{prefix}ci_high"] for r in rows if r.get(f"{prefix}ci_high") is not None]
        return {"rate": sum(r[num] for r in rows) / n, "ci": [min(lows) if lows else None,
                                                              max(highs) if highs else None], "n": n}

    helpful = [r for r in evaluation.get("helpfulness", []) if r["set"] == "benign"]
    over = evaluation.get("over_refusal", [])
    return {
        "harmful": harmful_row("trigger"),
        "harmful_no_trigger": harmful_row("no_trigger"),
        "benign_helpfulness": pooled(helpful, "answered", "n", "answered_"),
        "format_following": pooled(helpful, "format_followed", "format_checked", "format_"),
        "over_refusal": pooled(over, "refused", "n", ""),
    }


def compute_attribution_quality(ranking_paths: dict[str, str], labels_path: Path) -> dict[str, Any]:
    """AUROC and precision at the contaminated count of every ranking, against ground-truth labels."""
    from pairtrace.attribute import load_ranking
    from pairtrace.labels import compute_ranking_quality, load_labels

    labels = load_labels(labels_path)
    quality = {}
    for method, path in ranking_paths.items():
        q = compute_ranking_quality(load_ranking(path).table, labels)
        if q is not None:
            quality[method] = q
    return quality


def _answered_flags(ctx: RunContext, units: list[RetrainUnit]) -> dict[str, list[bool]] | None:
    """Per benign prompt, the answered flags of the evaluation samples of an experiment's retrains (its seeds),
    pooled; None if one of them is not on disk."""
    from pairtrace.evaluate import compute_answered_flags

    pooled: dict[str, list[bool]] = {}
    for unit in units:
        path = ctx.path("retrains", unit.name, "generations.jsonl")
        if not path.is_file():
            return None
        for prompt, flags in compute_answered_flags(read_jsonl(path)).items():
            pooled.setdefault(prompt, []).extend(flags)
    return pooled


def _helpfulness_change(ctx: RunContext, base: dict[str, list[bool]] | None,
                        units: list[RetrainUnit]) -> dict[str, Any] | None:
    """Benign helpfulness of a retrain (its seeds pooled) minus the baseline's, with a paired 95% interval over
    shared prompts."""
    from pairtrace.stats import bootstrap_paired_difference

    flags = _answered_flags(ctx, units)
    if base is None or flags is None:
        return None
    ci = bootstrap_paired_difference(base, flags, seed=ctx.config.seed)
    if not ci.n_clusters:
        return None
    return {"change": ci.difference, "ci": [ci.low, ci.high], "n_prompts": ci.n_clusters,
            "interval": "paired percentile bootstrap over prompts"}


def experiment_metrics(ctx: RunContext, name: str, units: list[RetrainUnit],
                       outcomes: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The metrics of one experiment (its seeds pooled) and, with several seeds, each seed's headline rates."""
    if len(units) == 1:
        return outcomes[units[0].name]["metrics"], None
    from pairtrace.evaluate import evaluate_generations
    from pairtrace.retrain_seeds import pool_seed_records

    per_seed_records = [(read_jsonl(ctx.path("retrains", u.name, "generations.jsonl")),
                         read_jsonl(ctx.path("retrains", u.name, "judgements.jsonl"))) for u in units]
    gens, judgements = pool_seed_records(per_seed_records, name)
    evaluation = evaluate_generations(gens, judgements)
    write_json_atomic(evaluation, ctx.path("retrains", name, "evaluation_seeds.json"))
    per_seed = []
    for unit in units:
        metrics = outcomes[unit.name]["metrics"]
        per_seed.append({"seed": unit.seed, "retrain": unit.name,
                         **{key: (metrics.get(key) or {}).get("rate")
                            for key in ("harmful", "harmful_no_trigger", "benign_helpfulness")}})
    return summarise_evaluation(evaluation, name), per_seed


def generation_engines(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    """Which engine sampled each generation stage: ``probe_generations`` and ``evaluation`` as written by the
    stage (``engine.json``; ``hf`` for outputs older than that file), ``steer`` always Hugging Face (it needs
    hooks), ``None`` for a stage that did not run. Evaluation retrains that differ give a sorted list."""
    import json

    def engine_of(folder: Path) -> str | None:
        if not (folder / "generations.jsonl").is_file():
            return None
        path = folder / "engine.json"
        return json.loads(path.read_text(encoding="utf-8"))["engine"] if path.is_file() else "hf"

    evaluation = sorted({e for u in plan.units if (e := engine_of(ctx.path("retrains", u.name))) is not None})
    return {
        "probe_generations": engine_of(ctx.path("probe")),
        "evaluation": (evaluation[0] if len(evaluation) == 1 else evaluation) or None,
        "steer": "hf" if ctx.config.extras.steer else None,
    }


def retrain_engines(ctx: RunContext, outcomes: dict[str, Any]) -> dict[str, Any]:
    """The retrain engine that ran (from each retrain's summary; several give a sorted list, e.g. after a resume
    with another engine) and the run's engine options."""
    from dataclasses import asdict

    ran = sorted({str(o["train"]["engine"]) for o in outcomes.values() if (o.get("train") or {}).get("engine")})
    engine = ran[0] if len(ran) == 1 else ran or ctx.config.validation.retrain.engine
    return {"retrain": engine, "retrain_options": asdict(ctx.config.validation.retrain)}


def collect_results(ctx: RunContext, plan: Plan, rankings: dict[str, Any], quality: dict[str, Any],
                    sources: dict[str, Any] | None, outcomes: dict[str, Any], discovery: dict[str, Any] | None,
                    steer: dict[str, Any] | None, config_path: str | None = None) -> dict[str, Any]:
    """Everything ``results.json`` holds (the checks are added by the caller)."""
    from pairtrace.cost import cost_table, load_costs

    base_units = plan.units_of("baseline")
    base, base_per_seed = experiment_metrics(ctx, "baseline", base_units, outcomes)
    base = {**base, "seeds": [u.seed for u in base_units], "per_seed": base_per_seed}
    base_rate = (base.get("harmful") or {}).get("rate")
    base_answered = _answered_flags(ctx, base_units)
    interventions = []
    for exp in plan.experiments:
        if exp.is_baseline:
            continue
        own = plan.units_of(exp.name)
        metrics, per_seed = experiment_metrics(ctx, exp.name, own, outcomes)
        rate = (metrics.get("harmful") or {}).get("rate")
        reduction = (base_rate - rate) / base_rate if base_rate and rate is not None else None
        interventions.append({
            "name": exp.name, "method": exp.method,
            "action": exp.action if exp.method != "sources" else "source_ablation", "k": exp.k,
            "models": list(exp.models) or None, **metrics, "reduction": reduction,
            "benign_helpfulness_change": _helpfulness_change(ctx, base_answered, own),
            "intervention": outcomes[own[0].name]["intervention"],
            "seeds": [u.seed for u in own], "per_seed": per_seed,
        })
    return {
        "config": ctx.config.to_dict(),
        "pairtrace_version": __version__,
        "versions": library_versions(),
        "hardware": describe_hardware(),
        "timings": ctx.cache.timings,
        "n_pairs": rankings["n_pairs"],
        "layer": rankings["layer"],
        "headline_k": plan.headline_k,
        "k_values": list(plan.k_values),
        "organism": ctx.inputs.organism_summary,
        "baseline": base,
        "interventions": interventions,
        "attribution_quality": quality,
        "cost": cost_table(load_costs(ctx.path("cost.json")), reference="probe"),
        "sources": sources,
        "discovery": discovery,
        "steer": steer,
        "engines": {**retrain_engines(ctx, outcomes), **generation_engines(ctx, plan)},
        "commands": [f"pairtrace run {config_path or 'CONFIG'} --out {ctx.out}", f"pairtrace report {ctx.out}"],
    }
