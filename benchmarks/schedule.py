"""How much the retrain queue's overlap saves: the same experiment run from scratch with ``validation.overlap``
off (every stage after the one before it) and on (baseline and random retrains beside M1's training and the
ranking stages, discovery and steering beside the ranked retrains), in one process, alternating.

Each run builds its own organism into its own folder, so both pay the same work; the script prints each run's wall
clock, the ratio, and whether the two ``results.json`` agree in every number (they must: the schedule changes when
a retrain runs, never what it computes). The default is the reduced organism (``configs/organism-quick.yaml``,
about 4 minutes a run on a quiet 2-core CPU); ``--config configs/organism.yaml`` times the default experiment
(about 20 minutes a run). Run::

    .venv/bin/python benchmarks/schedule.py --out runs/schedule
    .venv/bin/python benchmarks/schedule.py --config configs/organism.yaml --out runs/schedule-default
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {"sequential": False, "overlap": True}
"""Schedule name -> ``validation.overlap``."""
VOLATILE = {"timings", "hardware", "cost", "checks", "config", "commands", "versions", "engines", "load_average",
            "wall_s", "seconds", "train", "environment"}
"""Keys of ``results.json`` that hold times, paths of the run folder or the machine, not results."""


def write_config(config: Path, overlap: bool, out: Path) -> Path:
    """A copy of the run config with ``validation.overlap`` set (its organism path made absolute)."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data.setdefault("validation", {})["overlap"] = overlap
    organism = data.get("organism")
    if isinstance(organism, str) and not Path(organism).is_absolute():
        data["organism"] = str((config.parent / organism).resolve())
    path = out / f"{'overlap' if overlap else 'sequential'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def comparable(value: Any, run_dir: str) -> Any:
    """``results.json`` without its times and machine details, with the run folder's path replaced."""
    if isinstance(value, dict):
        if value.get("check") == "build seconds":  # the organism's own timing check
            return {"check": "build seconds"}
        return {k: comparable(v, run_dir) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [comparable(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    return value


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two plain-data trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{path}/{key}") if key in a and key in b else [f"{path}/{key}"]
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "/"]


def run_once(config: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """Run the experiment from scratch into ``out``; returns (wall seconds, results)."""
    from pairtrace.experiment.run import run_experiment

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    results = run_experiment(config, out, progress=False)
    return time.perf_counter() - started, results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "organism-quick.yaml", help="Run config.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each schedule (alternating; fastest kept).")
    parser.add_argument("--out", type=Path, default=Path("runs/schedule"), help="Work folder (runs are replaced).")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from pairtrace.environment import describe_hardware

    walls: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    results: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for name, overlap in SCHEDULES.items():
            run_dir = args.out / f"{name}-{repeat}"
            seconds, results[name] = run_once(write_config(args.config, overlap, args.out), run_dir)
            results[name] = comparable(results[name], str(run_dir.resolve()))
            walls[name].append(seconds)
            print(f"{name:<10} run {repeat}: {seconds / 60:.2f} min", flush=True)
    best = {name: min(times) for name, times in walls.items()}
    diff = differences(results["sequential"], results["overlap"])
    hardware = describe_hardware()
    print(f"\nconfig {args.config}, {hardware.get('cpu')}, {hardware.get('cpu_count')} cores, fastest of "
          f"{args.repeats} run(s) each")
    print(f"sequential stages: {best['sequential'] / 60:.2f} min")
    print(f"overlap:           {best['overlap'] / 60:.2f} min")
    print(f"speed-up: {best['sequential'] / best['overlap']:.2f}x "
          f"({(best['sequential'] - best['overlap']) / 60:.2f} min saved)")
    print("results.json: " + ("every number the same" if not diff else f"{len(diff)} differences: {diff[:10]}"))
    record = {"config": str(args.config), "walls_s": walls, "speedup": best["sequential"] / best["overlap"],
              "differences": diff, "hardware": hardware}
    (args.out / "schedule.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())
