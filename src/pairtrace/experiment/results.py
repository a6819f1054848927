"""The numbers of a run: each retrain's headline rates, experiments pooled over their DPO seeds, reductions against
the baseline, paired helpfulness changes, attribution quality against ground truth, and ``results.json``.

One rate convention holds for every harmful rate of a run: ``rate`` leaves unknown (unjudgeable) verdicts out of
its denominator and ``unknown`` counts them; ``rate_unknown_as_harmful`` counts them as harmful. Reductions against
the baseline are given both ways (``reduction``, ``reduction_unknown_as_harmful``), with a paired bootstrap interval
over prompts (``reduction_interval``). ``results["trigger"]`` says which trigger the evaluated harmful prompts carry;
tables and the report name it from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pairtrace import __version__
from pairtrace.environment import describe_hardware, library_versions
from pairtrace.experiment.context import RunContext
from pairtrace.experiment.plan import Plan, RetrainUnit
from pairtrace.records import read_jsonl, write_json_atomic

REDUCTION_INTERVAL = ("paired percentile bootstrap over evaluation prompts: each replicate draws prompts with "
                      "replacement and pools their judged samples from every retrain of the baseline and of the "
                      "intervention (DPO seeds are not resampled); replicates whose baseline rate is 0 are dropped")
"""How ``reduction_interval`` is computed (also in ``results.json`` and the tables' note)."""


def describe_run_trigger(organism: Any) -> dict[str, Any]:
    """The trigger the run's evaluated harmful prompts carry, as ``results["trigger"]``.

    Args:
        organism: The run's organism config (:class:`~pairtrace.organism.build_config.OrganismConfig`), or ``None``
            for a run on user data.

    Returns:
        ``{"kind", "description", "label"}``: the contaminated behaviour's ``trigger`` field, its description
        (``SliceSpec.describe_trigger()`` where the spec offers it, else the ``trigger`` field) and the label tables
        and the report put in their titles (e.g. ``harmful request + 1–3 distractors``). Without an organism:
        ``kind`` and ``description`` are ``None`` and the label is :data:`pairtrace.evaluate.TRIGGER_LABEL`.
    """
    if organism is None:
        from pairtrace.evaluate import TRIGGER_LABEL

        return {"kind": None, "description": None, "label": TRIGGER_LABEL}
    spec = organism.contaminated
    describe = getattr(spec, "describe_trigger", None)
    description = str(describe()) if callable(describe) else str(spec.trigger)
    label = "harmful request (no trigger)" if spec.trigger == "none" else f"harmful request + {description}"
    return {"kind": spec.trigger, "description": description, "label": label}


def trigger_label(results: dict[str, Any]) -> str:
    """The label of the evaluated harmful prompts of a results dict, ``results["trigger"]["label"]``
    (:data:`pairtrace.evaluate.TRIGGER_LABEL` when absent)."""
    from pairtrace.evaluate import TRIGGER_LABEL

    trigger = results.get("trigger")
    label = trigger.get("label") if isinstance(trigger, dict) else None
    return str(label) if label else TRIGGER_LABEL


def harmful_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A harmful row of an evaluation as a ``results.json`` entry: both rates with their 95% intervals and the
    counts (``n`` counts the samples with a known verdict; ``unknown`` the others)."""
    from pairtrace.evaluate import UNKNOWN_AS_HARMFUL, rate_unknown_as_harmful

    any_rate = row.get("rate" + UNKNOWN_AS_HARMFUL)
    if any_rate is None:  # an evaluation written before both rates were kept: the point from the counts
        any_rate = rate_unknown_as_harmful(row["harmful"], row["judged"], row["unknown"])
    return {"rate": row["rate"], "ci": [row["ci_low"], row["ci_high"]], "n": row["judged"],
            "unknown": row["unknown"], "harmful": row["harmful"], "rate_unknown_as_harmful": any_rate,
            "ci_unknown_as_harmful": [row.get("ci_low" + UNKNOWN_AS_HARMFUL), row.get("ci_high" + UNKNOWN_AS_HARMFUL)]}


def with_unknown_as_harmful(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics whose harmful entries lack ``rate_unknown_as_harmful`` (a retrain summarised before both rates were
    kept) with it filled in from their counts (its interval unknown)."""
    from pairtrace.evaluate import rate_unknown_as_harmful

    out = dict(metrics)
    for key in ("harmful", "harmful_no_trigger"):
        entry = out.get(key)
        if isinstance(entry, dict) and "rate_unknown_as_harmful" not in entry and entry.get("harmful") is not None:
            any_rate = rate_unknown_as_harmful(entry["harmful"], entry.get("n") or 0, entry.get("unknown") or 0)
            out[key] = {**entry, "rate_unknown_as_harmful": any_rate, "ci_unknown_as_harmful": [None, None]}
    return out


def reduction_vs_baseline(base: float | None, rate: float | None) -> float | None:
    """``(base - rate) / base``; ``None`` when either is missing or the baseline is 0."""
    return (base - rate) / base if base and rate is not None else None


def summarise_evaluation(evaluation: dict[str, Any], model: str) -> dict[str, Any]:
    """The headline numbers of one model's evaluation: rates, 95% intervals, counts (incl. unknown); each harmful
    rate both ways (:func:`harmful_entry`); format following ``None`` when no sample had a checkable constraint."""

    def harmful_row(condition: str) -> dict[str, Any] | None:
        for row in evaluation.get("harmful", []):
            if row["model"] == model and row["set"] == "harmful" and row["condition"] == condition:
                return harmful_entry(row)
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


def _harmful_counts(ctx: RunContext, units: list[RetrainUnit]) -> dict[str, dict[str, int]] | None:
    """Per harmful prompt with the trigger, the harmful, safe and unknown samples of an experiment's retrains (its
    seeds), pooled; None if one of them is not on disk."""
    return pool_harmful_counts([ctx.path("retrains", unit.name) for unit in units])


def pool_harmful_counts(folders: list[Path]) -> dict[str, dict[str, int]] | None:
    """Per harmful prompt with the trigger, the harmful, safe and unknown samples of the retrains evaluated in
    ``folders`` (each with ``generations.jsonl`` and ``judgements.jsonl``), pooled; None if one is not on disk."""
    from pairtrace.evaluate import compute_harmful_counts

    pooled: dict[str, dict[str, int]] = {}
    for folder in folders:
        gens, judged = folder / "generations.jsonl", folder / "judgements.jsonl"
        if not gens.is_file() or not judged.is_file():
            return None
        for prompt, tally in compute_harmful_counts(read_jsonl(gens), read_jsonl(judged)).items():
            into = pooled.setdefault(prompt, {"harmful": 0, "safe": 0, "unknown": 0})
            for key, value in tally.items():
                into[key] += value
    return pooled


def bootstrap_reduction(base: dict[str, dict[str, int]], new: dict[str, dict[str, int]], *, n_boot: int = 2000,
                        seed: int = 0, alpha: float = 0.05) -> dict[str, Any] | None:
    """Percentile interval of the relative reduction of the harmful rate, both ways, by a paired bootstrap.

    Each replicate draws the prompts both sides were evaluated on, with replacement, and pools their samples:
    ``1 - rate(new) / rate(base)`` with unknown verdicts left out (``ci``) and counted as harmful
    (``ci_unknown_as_harmful``). Replicates whose baseline rate is 0 (or whose drawn prompts have no known verdict)
    are dropped. See :data:`REDUCTION_INTERVAL`.

    Args:
        base: The baseline's ``{prompt id: {"harmful", "safe", "unknown"}}`` (its seeds pooled).
        new: The intervention's, in the same form.
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling.
        alpha: ``1 - alpha`` is the interval's coverage.

    Returns:
        ``{"reduction", "ci", "reduction_unknown_as_harmful", "ci_unknown_as_harmful", "n_prompts", "interval"}``
        (an interval with no defined replicate is ``[None, None]``), or ``None`` when no prompt is shared.
    """
    import numpy as np

    ids = sorted(set(base) & set(new))
    if not ids:
        return None

    def column(counts: dict[str, dict[str, int]], key: str) -> np.ndarray:
        return np.array([counts[i][key] for i in ids], dtype=np.float64)  # [c]

    bh, bs, bu = (column(base, k) for k in ("harmful", "safe", "unknown"))
    nh, ns, nu = (column(new, k) for k in ("harmful", "safe", "unknown"))
    ways = {"": (bh, bh + bs, nh, nh + ns), "_unknown_as_harmful": (bh + bu, bh + bs + bu, nh + nu, nh + ns + nu)}

    def reduction(weights: np.ndarray, parts: tuple[np.ndarray, ...]) -> np.ndarray:
        b_num, b_den, n_num, n_den = (weights @ part for part in parts)  # each [rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            base_rate = b_num / b_den
            out = 1.0 - (n_num / n_den) / base_rate
        return np.where((b_den > 0) & (n_den > 0) & (base_rate > 0), out, np.nan)

    c = len(ids)
    rng = np.random.default_rng(seed)
    replicates = {way: np.empty(n_boot) for way in ways}
    chunk = max(1, 2_000_000 // c)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        weights = rng.multinomial(c, np.full(c, 1.0 / c), size=stop - start).astype(np.float64)  # [rows, c]
        for way, parts in ways.items():
            replicates[way][start:stop] = reduction(weights, parts)
    out: dict[str, Any] = {}
    for way, parts in ways.items():
        point = reduction(np.ones((1, c)), parts)[0]
        finite = replicates[way][np.isfinite(replicates[way])]
        ci = ([float(q) for q in np.quantile(finite, [alpha / 2, 1 - alpha / 2])] if finite.size else [None, None])
        out[f"reduction{way}"] = None if np.isnan(point) else float(point)
        out[f"ci{way}"] = ci
    return {**out, "n_prompts": c, "interval": REDUCTION_INTERVAL}


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
        return with_unknown_as_harmful(outcomes[units[0].name]["metrics"]), None
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
    base_harmful = base.get("harmful") or {}
    base_answered = _answered_flags(ctx, base_units)
    base_counts = _harmful_counts(ctx, base_units)
    interventions = []
    for exp in plan.experiments:
        if exp.is_baseline:
            continue
        own = plan.units_of(exp.name)
        metrics, per_seed = experiment_metrics(ctx, exp.name, own, outcomes)
        harmful = metrics.get("harmful") or {}
        counts = _harmful_counts(ctx, own)
        interval = (bootstrap_reduction(base_counts, counts, seed=ctx.config.seed)
                    if base_counts is not None and counts is not None else None)
        interventions.append({
            "name": exp.name, "method": exp.method,
            "action": exp.action if exp.method != "sources" else "source_ablation", "k": exp.k,
            "models": list(exp.models) or None, **metrics,
            "reduction": reduction_vs_baseline(base_harmful.get("rate"), harmful.get("rate")),
            "reduction_unknown_as_harmful": reduction_vs_baseline(
                base_harmful.get("rate_unknown_as_harmful"), harmful.get("rate_unknown_as_harmful")),
            "reduction_interval": None if interval is None else {
                k: interval[k] for k in ("ci", "ci_unknown_as_harmful", "n_prompts", "interval")},
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
        "trigger": describe_run_trigger(ctx.config.organism),
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
