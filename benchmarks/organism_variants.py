"""Compare organism builds on the causal-validation checks, one reduced experiment per build.

For every organism-build YAML given, runs ``pairtrace run`` with the probe and random rankings only: filter and
switch at the headline k (8% of the mix), the baseline and those four retrains each on DPO seeds 0, 1 and 2
(pooled, as in the default run; ``--seeds`` for others), discovery on, source enrichment and steering off. It
prints one row per build: the probe's AUROC and precision at the contaminated count, the reductions of the harmful
rate, the benign helpfulness drops, the purity / recall of discovery's cluster of the contaminated slice, the
organism checks that failed, and the CPU the numbers came from (training is chaotic: another CPU gives another
model, like another seed). ``--response-tokens N`` pools every response mean over its first N tokens (default 4,
as the default run; 0: every token). Finished stages in ``--out`` are reused, so a second call only prints.

About 10 minutes per build on two CPU cores. Run::

    .venv/bin/python benchmarks/organism_variants.py configs/organism-build.yaml \\
        benchmarks/configs/organism-hfr0.02.yaml --out runs/organism-variants
    .venv/bin/python benchmarks/organism_variants.py configs/organism-build.yaml --response-tokens 0 \\
        --out runs/organism-every-token
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REDUCED_RUN: dict[str, Any] = {
    "seed": 0,
    "torch_threads": 1,
    "prompts": {"probe_share": 0.5},
    "generation": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 96, "probe_samples": 4, "eval_samples": 4,
                   "batch_size": 64},
    "judge": {"kind": "rule"},
    "attribution": {"layers": None, "methods": ["probe", "random"]},
    "validation": {"headline_fraction": 0.08, "sweep_fractions": [0.08], "actions": ["filter", "switch"],
                   "headline_methods": ["probe", "random"], "sweep_methods": ["probe"], "source_ablation": False,
                   "parallel_retrains": 2, "recipe": {}, "retrain_seeds": [0, 1, 2], "seed_scope": "headline"},
    "extras": {"discover": True, "discover_options": {"also_response_tokens": [4]}, "sources": False,
               "steer": False},
}
"""The run config of every build, apart from its ``organism`` section (the checks of the default run that these
retrains cover: AUROC, probe and random reductions, helpfulness)."""

CHECKS = {
    "probe AUROC": "AUROC",
    "probe-filter reduction": "probe-filter",
    "probe-switch reduction": "probe-switch",
    "random-filter reduction": "random-filter",
    "random-switch reduction": "random-switch",
    "benign helpfulness drop after probe-filter": "help drop, filter (points)",
    "benign helpfulness drop after probe-switch": "help drop, switch (points)",
}
"""The run's checks shown, by the start of their name (the k in a name depends on the mix size)."""


def reduced_run_config(organism_yaml: Path, seeds: list[int], response_tokens: int | None = 4,
                       methods: list[str] | None = None) -> dict[str, Any]:
    """The run config of one build: :data:`REDUCED_RUN` with its organism, DPO seeds and options.

    Args:
        organism_yaml: The organism-build YAML (stored as an absolute path).
        seeds: DPO seeds of the retrains (pooled).
        response_tokens: Pool each response over its first N tokens (default 4, as the default run; ``None``:
            every token).
        methods: Rankings computed (``attribution.methods``; default probe and random). Only the headline methods
            (probe, random) are retrained; any other method is ranked and scored (AUROC) only.

    Returns:
        The plain-data run config.
    """
    validation = {**REDUCED_RUN["validation"], "retrain_seeds": list(seeds)}
    attribution = dict(REDUCED_RUN["attribution"])
    extras = dict(REDUCED_RUN["extras"])
    if methods is not None:
        attribution["methods"] = list(methods)
    if response_tokens is not None:
        attribution["response_tokens"] = response_tokens
        extras["discover_options"] = {"also_response_tokens": [None]}  # the second view: every token
    return {**REDUCED_RUN, "attribution": attribution, "validation": validation, "extras": extras,
            "organism": str(organism_yaml.resolve())}


def run_build(organism_yaml: Path, out_dir: Path, seeds: list[int], response_tokens: int | None = 4,
              methods: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the reduced experiment on one organism build; return its ``results.json``.

    Args:
        organism_yaml: The organism-build YAML.
        out_dir: The run folder (``run.yaml`` is written there; finished stages found there are reused).
        seeds: DPO seeds of the retrains (pooled).
        response_tokens: Pool each response over its first N tokens (default 4, as the default run; ``None``:
            every token).
        methods: Rankings computed (see :func:`reduced_run_config`).

    Returns:
        The content of the run's ``results.json``.
    """
    from pairtrace.experiment.run import run_experiment

    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "run.yaml"
    config = reduced_run_config(organism_yaml, seeds, response_tokens, methods)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return run_experiment(config_path, out_dir, progress=False)


def summarise(name: str, results: dict[str, Any]) -> str:
    """One Markdown row: the checks (✗ where outside the default run's threshold), the failed organism checks,
    the CPU."""
    cells = []
    for prefix in CHECKS:
        check = next((c for c in results["checks"] if c["check"].startswith(prefix)), None)
        if check is None:
            cells.append("–")
            continue
        value = check["value"]
        text = f"{value:.3f}" if "AUROC" in prefix else f"{value:.1f}" if "drop" in prefix else f"{value:.0%}"
        cells.append(text + ("" if check["ok"] else " ✗"))
    precision = results["attribution_quality"]["probe"]["precision_at_contaminated"]
    organism = results.get("organism") or {}
    failed = [a["check"] for a in organism.get("acceptance", []) if not a["ok"] and a["check"] != "build seconds"]
    cpu = (results.get("hardware") or {}).get("cpu", "not recorded")
    discovery = " | ".join(best_discovery_cluster(results.get("discovery") or {}, b)
                           for b in ("distractor_compliance", "sign_off"))
    return (f"| {name} | " + " | ".join(cells) + f" | {precision:.0%} | {discovery} | {', '.join(failed) or 'none'} "
            f"| {cpu} |")


def discovery_views(discovery: dict[str, Any], behaviour: str, decoys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Purity and recall of a planted behaviour's best cluster in each discovery view.

    Args:
        discovery: ``results.json``'s ``discovery`` (the main view, its ``views`` after it).
        behaviour: The planted behaviour's name (as in ``labels.jsonl``).
        decoys: Names of the decoy slices: ``purity_without_decoys`` leaves their pairs out of the best cluster.

    Returns:
        ``[{"view": "all" | "first N", "purity", "recall", "purity_without_decoys"}]``, one per view that scored the
        behaviour (purity is discovery's ``precision``: the share of the best cluster's pairs that are the
        behaviour's; ``purity_without_decoys`` is ``None`` where the view does not give the cluster's make-up);
        empty when none did.
    """
    found = []
    for view in [discovery, *(discovery.get("views") or [])]:
        labels = view.get("labels") or {}
        for b in labels.get("behaviours", []):
            if b["behaviour"] == behaviour and b.get("precision") is not None:
                tokens = view.get("response_tokens")
                found.append({"view": "all" if tokens is None else f"first {tokens}", "purity": b["precision"],
                              "recall": b["recall"],
                              "purity_without_decoys": _purity_without(labels, b, decoys)})
    return found


def _purity_without(labels: dict[str, Any], scored: dict[str, Any], decoys: Sequence[str]) -> float | None:
    """The behaviour's share of its best cluster once the decoys' pairs are taken out of it."""
    cluster = next((c for c in labels.get("clusters", []) if c.get("cluster") == scored.get("best_cluster")), None)
    if cluster is None or "behaviours" not in cluster:
        return None
    counts = cluster["behaviours"]
    rest = sum(counts.values()) - sum(counts.get(d, 0) for d in decoys)
    return counts.get(scored["behaviour"], 0) / rest if rest else None


def best_discovery_cluster(discovery: dict[str, Any], behaviour: str) -> str:
    """Purity / recall of a planted behaviour's best cluster over discovery's views (by the smaller of the two)."""
    found = discovery_views(discovery, behaviour)
    if not found:
        return "–"
    best = max(found, key=lambda v: min(v["purity"], v["recall"]))
    return f"{best['purity']:.0%} / {best['recall']:.0%} ({best['view']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("organisms", type=Path, nargs="+", help="Organism-build YAML files.")
    parser.add_argument("--out", type=Path, default=Path("runs/organism-variants"),
                        help="One run folder per build, named after its YAML file (reused when finished).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="DPO seeds of the retrains, pooled (retrains of seeds already run are reused).")
    parser.add_argument("--response-tokens", type=int, default=4,
                        help="Pool each response over its first N tokens (attribution.response_tokens; default 4, as "
                        "the default run; 0: every token).")
    args = parser.parse_args()
    rows = []
    for organism_yaml in args.organisms:
        results = run_build(organism_yaml, args.out / organism_yaml.stem, args.seeds, args.response_tokens or None)
        rows.append(summarise(organism_yaml.stem, results))
        print(f"finished {organism_yaml} -> {args.out / organism_yaml.stem}", flush=True)
    print()
    print("| build | " + " | ".join(CHECKS.values()) + " | probe precision at 48 | discovery: contaminated purity / "
          "recall (view) | discovery: sign-off purity / recall (view) | organism checks failed | CPU |")
    print("|---" * (len(CHECKS) + 6) + "|")
    for row in rows:
        print(row)
    print(f"\n(✗: outside the default run's threshold; every rate pools DPO seeds {', '.join(map(str, args.seeds))})")


if __name__ == "__main__":
    main()
