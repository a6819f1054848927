"""Scoring at scale: 1M x 4096 datapoint vectors against 1,000 behaviour vectors, in chunks, with peak memory.

Three measurements, each in a fresh child process that reports its own peak resident set size:

1. ``synthetic``: the scoring arithmetic at full size. ``--n`` rows (default 1,000,000) of width ``--d`` (4096)
   are scored against ``--m`` (1,000) unit behaviour vectors with the bank method (max cosine), in chunks of
   ``--chunk-rows``. The rows are not stored anywhere (16 GB in float32): two random float32 chunks are made once
   and cycled, so the time is the scoring alone (norms, one matrix product per chunk, max, division).
2. ``store``: end to end from disk. The parent writes real bf16 vector stores of ``--store-n`` rows (default
   32,768 and 131,072; the larger is 1 GiB) with a manifest; a child opens each and runs ``rank_store`` (reading
   shards, scoring, ranking with ids). Peak RSS is compared across the sizes; the time for 1M rows is extrapolated
   linearly from the largest and labelled as such.
3. ``faiss`` (if installed): the synthetic measurement with the faiss engine on ``--faiss-n`` rows.

Run::

    .venv/bin/python benchmarks/scoring.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _units(m: int, d: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    u = torch.randn(m, d, generator=gen)
    return u / u.norm(dim=1, keepdim=True)


def child_synthetic(args: argparse.Namespace) -> dict:
    """Score ``args.n`` synthetic rows chunk by chunk."""
    import torch

    from pairtrace.scoring import score_rows

    units = _units(args.m, args.d)
    gen = torch.Generator().manual_seed(0)
    pool = [torch.randn(args.chunk_rows, args.d, generator=gen) for _ in range(2)]  # [rows, d] each
    scores = torch.empty(args.n)  # [n]
    start = time.perf_counter()
    for k, begin in enumerate(range(0, args.n, args.chunk_rows)):
        end = min(args.n, begin + args.chunk_rows)
        chunk = pool[k % 2][: end - begin].clone()  # a fresh chunk, as a store read would give
        scores[begin:end] = score_rows(chunk, units, "bank", args.engine)
    seconds = time.perf_counter() - start
    assert torch.isfinite(scores).all()
    return {"seconds": seconds, "rows": args.n}


def child_store(args: argparse.Namespace) -> dict:
    """Rank every row of an on-disk store."""
    from types import SimpleNamespace

    import torch

    from pairtrace.attribute import AttributionConfig
    from pairtrace.scoring import rank_store
    from pairtrace.store import VectorStore

    store = VectorStore.open(args.store)
    bank = _units(args.m, args.d)[:, None, :]  # [m, 1, d]
    behaviour = SimpleNamespace(layers=[1], probe=bank.mean(0), bank=bank, per_triple=bank,
                                metadata={"model": store.manifest.model, "template": store.manifest.template})
    start = time.perf_counter()
    ranking = rank_store(store, behaviour, AttributionConfig(method="bank", layer=1, chunk_rows=args.chunk_rows),
                         progress=False)
    seconds = time.perf_counter() - start
    assert len(ranking) == store.n and bool(torch.isfinite(torch.tensor(ranking.table["score"].to_numpy())).all())
    return {"seconds": seconds, "rows": store.n}


def write_store(directory: Path, n: int, d: int, shard_size: int) -> float:
    """A bf16 datapoint store of random rows; returns seconds."""
    import torch

    from pairtrace.store import Manifest, write_shard

    start = time.perf_counter()
    manifest = Manifest(
        kind="datapoint", model={"name": "synthetic", "weights_hash": "sha256:0"}, layers=[1],
        template={"mode": "plain", "hash": "sha256:0"}, dataset={"origin": "synthetic", "fingerprint": "0",
                                                                  "n_pairs": n},
        ids=[f"pair-{i:08d}" for i in range(n)], shard_size=shard_size, dtype="bfloat16",
        n_shards=(n + shard_size - 1) // shard_size, hidden_size=d,
    )
    directory.mkdir(parents=True, exist_ok=True)
    manifest.save(directory)
    gen = torch.Generator().manual_seed(2)
    for index in range(manifest.n_shards):
        a, b = manifest.shard_range(index)
        write_shard(directory, index, {"layer_1": torch.randn(b - a, d, generator=gen).to(torch.bfloat16),
                                       "n_response_tokens": torch.ones(b - a, 2, dtype=torch.long)})
    return time.perf_counter() - start


def run_child(kind: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """Run one measurement in a fresh process and read its JSON line."""
    command = [sys.executable, __file__, "--child", kind, "--d", str(args.d), "--m", str(args.m),
               "--chunk-rows", str(args.chunk_rows), *extra]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print seconds, throughput and peak memory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic rows")
    parser.add_argument("--d", type=int, default=4096, help="vector width")
    parser.add_argument("--m", type=int, default=1000, help="behaviour vectors (bank size)")
    parser.add_argument("--chunk-rows", type=int, default=16384, help="rows per chunk")
    parser.add_argument("--store-n", type=int, nargs="*", default=[32768, 131072], help="rows of on-disk stores")
    parser.add_argument("--faiss-n", type=int, default=131072, help="rows for the faiss engine (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    parser.add_argument("--child", choices=["synthetic", "store"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        with torch.inference_mode():
            result = child_synthetic(args) if args.child == "synthetic" else child_store(args)
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0

    from pairtrace.scoring import chunk_memory_bytes, estimate_scoring_flops, faiss_available

    print(f"bank scoring: d {args.d}, m {args.m} behaviour vectors, chunks of {args.chunk_rows} rows "
          f"({chunk_memory_bytes(args.chunk_rows, args.d, args.m) / 2**20:.0f} MiB per chunk + products); "
          f"threads {args.threads or 'default'}")

    def line(name: str, r: dict) -> None:
        flops = estimate_scoring_flops(r["rows"], args.d, args.m)
        print(f"{name:30s} {r['rows']:9d} rows  {r['seconds']:8.1f} s  {r['rows'] / r['seconds']:9.0f} rows/s  "
              f"{flops / r['seconds'] / 1e9:6.1f} GFLOP/s  peak RSS {r['peak_mib']:7.0f} MiB")

    synthetic = run_child("synthetic", args, ["--n", str(args.n)])
    line("synthetic, torch (measured)", synthetic)
    if args.faiss_n and faiss_available():
        line("synthetic, faiss (measured)", run_child("synthetic", args, ["--n", str(args.faiss_n), "--engine",
                                                                          "faiss"]))
    stores = []
    for n in args.store_n:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "store"
            written = write_store(directory, n, args.d, shard_size=8192)
            size = sum(p.stat().st_size for p in directory.iterdir()) / 2**30
            print(f"wrote a bf16 store of {n} x {args.d} ({size:.2f} GiB) in {written:.1f} s")
            stores.append(run_child("store", args, ["--store", str(directory)]))
            line("store, rank_store (measured)", stores[-1])
    if stores:
        largest = stores[-1]
        if len(stores) > 1:
            print(f"store peak RSS {largest['rows']} / {stores[0]['rows']} rows = "
                  f"{largest['peak_mib'] / stores[0]['peak_mib']:.3f}")
        per_row = largest["seconds"] / largest["rows"]
        print(f"store, 1,000,000 rows: {per_row * 1e6:.0f} s EXTRAPOLATED linearly from the measured "
              f"{largest['rows']} rows (memory stays at one chunk + the [n] scores and ids)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
