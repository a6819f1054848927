"""Peak memory of datapoint extraction at 2k vs 20k pairs: it must not grow with the number of pairs.

Writes two JSON Lines files of short synthetic pairs (2,000 and 20,000 by default), builds a tiny OLMo 2 model,
and runs each extraction in a fresh child process, which reports its own peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and wall time. Two input paths are measured:

- ``stream``: ``compute_datapoint_vectors_from_source`` reads the file record by record (twice: a scan that
  writes ``pairs.parquet`` and the manifest, then the extraction, one store shard at a time);
- ``memory``: ``load_pairs`` first (every pair in a list), then ``compute_datapoint_vectors`` (for contrast).

It prints the peak RSS of each run and the ratio 20k / 2k for each path (target for ``stream``: <= 1.2).

Run::

    .venv/bin/python benchmarks/memory.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("sea", "bread", "robot", "paint", "river", "city", "music", "garden", "star", "book", "train", "cloud")


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """``n`` short single-turn pairs as standard-layout JSON Lines."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            a, b, c = rng.sample(WORDS, 3)
            record = {
                "id": f"pair-{i:07d}",
                "prompt": f"Tell me about the {a} and the {b}.",
                "chosen": f"The {a} is near the {b}, and the {c} is far.",
                "rejected": f"I cannot talk about the {c}.",
                "source": f"source-{i % 7}",
                "chosen_model": f"model-{i % 5}",
                "rejected_model": "model-x",
            }
            fh.write(json.dumps(record) + "\n")


def child(args: argparse.Namespace) -> int:
    """Run one extraction and print its peak RSS and time as JSON."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    from pairtrace.data.pairs import load_pairs
    from pairtrace.models import load_model
    from pairtrace.vectors import compute_datapoint_vectors, compute_datapoint_vectors_from_source

    loaded = load_model(args.model, device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.mode == "stream":
        store = compute_datapoint_vectors_from_source(loaded, args.pairs, args.out, layers=1, progress=False)
    else:
        store = compute_datapoint_vectors(loaded, load_pairs(args.pairs), args.out, layers=1, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": store.n, "peak_kib": peak, "before_kib": before, "seconds": seconds}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the children and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], help="small and large pair counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["stream", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT / "tests"))
    from testing_utils import build_tiny_model_dir

    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        model = build_tiny_model_dir(tmp_dir / "model", n_layers=2, hidden=32)
        for n in args.sizes:
            write_pairs(tmp_dir / f"pairs-{n}.jsonl", n)
        print(f"tiny model: 2 layers, hidden 32; layer 1; sizes {args.sizes}; each run in a fresh process")
        for mode in ("stream", "memory"):
            for n in args.sizes:
                command = [sys.executable, __file__, "--child", "--mode", mode, "--pairs",
                           str(tmp_dir / f"pairs-{n}.jsonl"), "--model", str(model), "--out",
                           str(tmp_dir / f"store-{mode}-{n}")]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-3000:])
                    return 1
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[(mode, n)] = result
                print(f"{mode:6s} {n:7d} pairs: peak RSS {result['peak_kib'] / 1024:7.1f} MiB "
                      f"(after loading the model {result['before_kib'] / 1024:7.1f} MiB), "
                      f"{result['seconds']:6.1f} s, {n / result['seconds']:7.0f} pairs/s")
    small, large = args.sizes
    ok = True
    for mode in ("stream", "memory"):
        ratio = results[(mode, large)]["peak_kib"] / results[(mode, small)]["peak_kib"]
        growth = (results[(mode, large)]["peak_kib"] - results[(mode, small)]["peak_kib"]) / 1024
        target = " (target <= 1.2)" if mode == "stream" else " (in-memory path, for contrast)"
        print(f"{mode:6s} peak RSS {large} / {small} pairs = {ratio:.3f}  (+{growth:.1f} MiB){target}")
        if mode == "stream":
            ok = ratio <= 1.2
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
