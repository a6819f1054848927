"""Datapoint-vector extraction speed: pairtrace (batched, early stop) vs the naive method, in one process.

Builds a tiny OLMo 2 model (8 layers, hidden 128, random weights) and its tokenizer in a temporary directory,
takes the first N pairs of HH-RLHF harmless-base test, and times, on the same pairs and the same tokens:

- pairtrace: ``compute_datapoint_vectors`` at one layer (length-sorted right-padded batches, forward stopped after
  the layer, shards written to disk);
- naive: batch size 1, two full forward passes per pair (chosen, rejected) keeping all hidden states.

It prints tokens/s for each, the speed-up ratio, and the largest relative difference between the two sets of
vectors. Each method runs ``--repeats`` times, alternating, and the fastest run counts (the machine is shared).

Run::

    .venv/bin/python benchmarks/extraction.py --n-pairs 200 --layer 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pairtrace.activations import compute_response_means_reference  # noqa: E402
from pairtrace.data.types import Pair, PairSet  # noqa: E402
from pairtrace.models import build_teacher_forcing, load_model  # noqa: E402
from pairtrace.vectors import compute_datapoint_vectors  # noqa: E402
from testing_utils import build_tiny_model_dir  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/hh_rlhf_harmless_base_test.jsonl.gz")


def _parse_hh_dialogue(text: str) -> tuple[tuple[dict[str, str], ...], str]:
    """Minimal HH-RLHF parser (used only if the project reader is unavailable): turns before the last reply."""
    turns = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        human, _, rest = chunk.partition("\n\nAssistant: ")
        turns.append({"role": "user", "content": human})
        if rest or _:
            turns.append({"role": "assistant", "content": rest})
    return tuple(turns[:-1]), turns[-1]["content"]


def load_benchmark_pairs(path: Path, n_pairs: int) -> PairSet:
    """First ``n_pairs`` HH-RLHF pairs, through ``pairtrace.data.pairs.load_pairs`` when it is importable."""
    try:
        from pairtrace.data.pairs import load_pairs
    except ImportError:
        load_pairs = None
    if load_pairs is not None:
        pair_set = load_pairs(path, limit=n_pairs)
        return PairSet(pairs=pair_set.pairs[:n_pairs], origin=str(path), fingerprint=pair_set.fingerprint)
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for row, line in enumerate(fh):
            if len(pairs) == n_pairs:
                break
            record = json.loads(line)
            prompt, chosen = _parse_hh_dialogue(record["chosen"])
            _, rejected = _parse_hh_dialogue(record["rejected"])
            pairs.append(Pair(id=str(row), row=row, prompt=prompt, chosen=chosen, rejected=rejected))
    return PairSet(pairs=pairs, origin=str(path))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF .jsonl.gz file")
    parser.add_argument("--n-pairs", type=int, default=200, help="number of pairs (from the start of the file)")
    parser.add_argument("--layer", type=int, default=5, help="layer to extract (hidden_states index)")
    parser.add_argument("--n-layers", type=int, default=8, help="decoder blocks of the tiny model")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="pairtrace token budget per batch")
    parser.add_argument("--max-length", type=int, default=2048, help="maximum tokens per sequence")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        model_dir = build_tiny_model_dir(tmp_dir / "model", n_layers=args.n_layers, hidden=args.hidden)
        loaded = load_model(model_dir, device="cpu")
        pairs = load_benchmark_pairs(args.data, args.n_pairs)
        prompts = [p.prompt for p in pairs]
        chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
        items = build_teacher_forcing(loaded, prompts * 2, chosen + rejected, args.max_length)
        n_tokens = sum(len(it.input_ids) for it in items)
        print(
            f"model: {args.n_layers} layers, hidden {args.hidden}, vocab {len(loaded.tokenizer)}; "
            f"{len(pairs)} pairs, {n_tokens} tokens ({sum(it.truncated for it in items)} sequences truncated); "
            f"layer {args.layer}; torch threads {torch.get_num_threads()}"
        )

        fast_times, naive_times = [], []
        fast = naive = None
        for run in range(args.repeats):
            start = time.perf_counter()
            store = compute_datapoint_vectors(
                loaded,
                pairs,
                tmp_dir / f"store-{run}",
                layers=args.layer,
                batch_tokens=args.batch_tokens,
                max_length=args.max_length,
                progress=False,
            )
            fast = store.load(args.layer)  # [n, d]
            fast_times.append(time.perf_counter() - start)

            start = time.perf_counter()
            c = compute_response_means_reference(loaded, prompts, chosen, args.layer, max_length=args.max_length)
            r = compute_response_means_reference(loaded, prompts, rejected, args.layer, max_length=args.max_length)
            naive = (c - r)[:, 0]  # [n, d]
            naive_times.append(time.perf_counter() - start)

        t_fast, t_naive = min(fast_times), min(naive_times)
        relative = ((fast - naive).norm(dim=1) / naive.norm(dim=1).clamp_min(1e-12)).nan_to_num(0.0)
        both_zero = int(((fast.norm(dim=1) == 0) & (naive.norm(dim=1) == 0)).sum())
        print(f"pairtrace: {t_fast:8.2f} s  {n_tokens / t_fast:10.0f} tokens/s  (runs: {fmt(fast_times)})")
        print(f"naive:     {t_naive:8.2f} s  {n_tokens / t_naive:10.0f} tokens/s  (runs: {fmt(naive_times)})")
        print(f"speed-up:  {t_naive / t_fast:.2f}x (target >= 3x)")
        print(f"agreement: max relative difference {float(relative.max()):.2e} ({both_zero} zero vectors in both)")
        ok = float(relative.max()) < 1e-4
        print("vectors agree" if ok else "VECTORS DISAGREE")
    return 0 if ok else 1


def fmt(times: list[float]) -> str:
    """Seconds of each run."""
    return ", ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    raise SystemExit(main())
