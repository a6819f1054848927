"""Screening before training on the default organism: AUROC per planted behaviour, and the causal check.

Runs (or resumes) ``pairtrace run benchmarks/configs/organism-screen.yaml --out OUT``, then prints:

- the AUROC of the example-based screen (M0 only) and of the M1-based probe for each planted behaviour of the
  organism (labels: ``organism/data/labels.jsonl``, field ``behaviour``), with the pairs passing each
  behaviour's calibrated threshold and how many of them carry the behaviour;
- the triggered harmful rate of M0 trained on the whole mix (the baseline) and on the mix without the screen's
  top 8%, each pooling the run's DPO seeds, the relative reduction, and the benign helpfulness change.

    python benchmarks/screening.py --out runs/organism-screen
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "organism-screen.yaml"
BEHAVIOURS = ("distractor_compliance", "sign_off")


def auroc(table: pd.DataFrame, labels: pd.DataFrame, behaviour: str) -> float:
    """AUROC of a ranking's scores for the pairs labelled ``behaviour`` (pairs without a score rank last)."""
    merged = table.merge(labels[["id", "behaviour"]], on="id", how="left")
    y = (merged["behaviour"] == behaviour).to_numpy()
    score = merged["score"].fillna(-np.inf).replace(-np.inf, merged["score"].min() - 1).to_numpy()
    return float(roc_auc_score(y, score))


def pct(x: float | None) -> str:
    """A rate as a percentage."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "organism-screen"), help="Run directory.")
    parser.add_argument("--config", default=str(CONFIG), help="Run config.")
    parser.add_argument("--no-run", action="store_true", help="Only read a finished run.")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    if not args.no_run:
        cmd = [sys.executable, "-m", "pairtrace", "run", args.config, "--out", str(out)]
        subprocess.run(cmd, check=True)
    wall = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text())
    labels = pd.read_json(out / "organism" / "data" / "labels.jsonl", lines=True)
    stage_s = sum(json.loads(p.read_text()).get("seconds") or 0 for p in (out / "stages").glob("*.json"))

    from pairtrace.attribute import load_ranking

    screen = json.loads((out / "rankings" / "screen" / "screen" / "screen.json").read_text())
    probe = load_ranking(out / "rankings" / "probe").table
    print("\nAUROC per planted behaviour (1,200 pairs; screen: examples through M0 only; probe: M1 triples)")
    print("| behaviour | pairs | screen AUROC | probe AUROC | pass threshold | of them the behaviour |")
    print("|---|---|---|---|---|---|")
    for name in BEHAVIOURS:
        table = load_ranking(out / "rankings" / "screen" / "screen" / "rankings" / name).table
        s = screen["behaviours"][name]
        passing = table[table["score"] >= s["threshold"]]
        hits = int(passing.merge(labels, on="id")["behaviour"].eq(name).sum())
        n_true = int(labels["behaviour"].eq(name).sum())
        print(f"| {name} | {n_true} | {auroc(table, labels, name):.3f} | {auroc(probe, labels, name):.3f} | "
              f"{s['n_pass']} (threshold {s['threshold']:.3f}) | {hits} |")

    base = results["baseline"]
    rows = [r for r in results["interventions"] if r["method"] == "screen" and r["action"] == "filter"]
    print(f"\nCausal check: DPO from M0, seeds {base.get('seeds')} pooled (triggered harmful rate = judged samples on "
          "held-out harmful requests with distractors)")
    print("| retrain from M0 | harmful rate [95% CI] | reduction | unknown | benign helpfulness | change [95% CI] |")
    print("|---|---|---|---|---|---|")

    def line(label: str, m: dict, reduction: float | None, change: dict | None) -> None:
        h, b = m.get("harmful") or {}, m.get("benign_helpfulness") or {}
        ci = h.get("ci") or [None, None]
        ch = "" if not change else (f"{100 * change['change']:+.1f} [{100 * change['ci'][0]:+.1f}, "
                                    f"{100 * change['ci'][1]:+.1f}] points")
        unknown = h.get("unknown") or 0
        share = unknown / (unknown + h["n"]) if h.get("n") else None
        print(f"| {label} | {pct(h.get('rate'))} [{pct(ci[0])}, {pct(ci[1])}] | "
              f"{'' if reduction is None else f'{100 * reduction:.0f}%'} | {pct(share)} | {pct(b.get('rate'))} | "
              f"{ch} |")

    line("whole mix (baseline)", base, None, None)
    for r in rows:
        line(f"screen filter top {r['k']} ({r['k'] / results['n_pairs']:.0%})", r, r.get("reduction"),
             r.get("benign_helpfulness_change"))
    for label, entry in [("baseline", base), *((r["name"], r) for r in rows)]:
        seeds = entry.get("per_seed") or []
        harmful = " · ".join(pct(x.get("harmful")) for x in seeds)
        helpful = " · ".join(pct(x.get("benign_helpfulness")) for x in seeds)
        print(f"each DPO seed, {label}: harmful {harmful}; benign helpfulness {helpful}")
    hw = results.get("hardware") or {}
    print(f"\nrun stages {stage_s / 60:.1f} min (sum of stages/*.json), this script {wall / 60:.1f} min; "
          f"hardware: {hw.get('cpu') or hw}")


if __name__ == "__main__":
    main()
