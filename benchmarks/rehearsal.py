"""The CPU rehearsal of the paper's code path: configs/rehearsal.yaml end to end, timed.

    .venv/bin/python benchmarks/rehearsal.py --out runs/rehearsal

Builds the reduced organism, publishes its M0 and M1 as hub repositories at a pinned revision in a local Hugging Face
cache (read offline), serves the rule judge behind an OpenAI-compatible endpoint, runs the experiment (chat template,
bfloat16 where the CPU has AMX, retrains with the accelerate engine in 2 gloo processes), retrains the baseline again
with the command engine and compares the two models. Prints the engine of every stage, the checks, the comparison
and how long each part took; writes OUT/rehearsal.json. See pairtrace.experiment.rehearsal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "rehearsal.yaml")
    parser.add_argument("--organism", type=Path, default=ROOT / "configs" / "organism-small.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/rehearsal"))
    parser.add_argument("--progress", action="store_true", help="Progress bars.")
    args = parser.parse_args()
    out = args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Hugging Face reads its cache location and offline mode when first imported: set them before any import
    from pairtrace.experiment.rehearsal import hub_cache_env

    os.environ.update(hub_cache_env(out / "inputs" / "hub"))
    from pairtrace.experiment.rehearsal import run_rehearsal

    summary = run_rehearsal(args.config, args.organism, out, progress=args.progress)
    print(json.dumps({k: summary[k] for k in ("engines", "models", "command_engine", "timings_s")}, indent=2))
    for check in summary["checks"] or []:
        print(f"check: {check['check']}: {check['value']:g} ({check['threshold']}) {'ok' if check['ok'] else 'NO'}")
    print(f"rehearsal: {summary['total_minutes']:.1f} min in all; {out / 'rehearsal.json'}")
    return 0 if summary["command_engine"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
