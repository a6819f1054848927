"""Datapoint-vector extraction speed: pairtrace vs the naive method and vs the forward-pass floor, in one process.

Builds a tiny OLMo 2 model (8 layers, hidden 128, random weights) and its tokenizer in a temporary directory,
takes the first N pairs of HH-RLHF harmless-base test, and times, on the same pairs:

- pairtrace: ``compute_datapoint_vectors`` at one layer, end to end (reading and tokenising the pairs, writing
  ``pairs.parquet``, length-sorted batches under a token budget, shared prompts where they pay, forward stopped
  after the layer, shards written to disk);
- naive: batch size 1, two full forward passes per pair (chosen, rejected) keeping all hidden states (the
  research code's method);
- floor: a bare forward pass of the truncated model (blocks 0..k-1, no hooks, no LM head) over exactly the
  batches pairtrace ran, collated in advance: the time the model itself needs for those tokens.

It prints tokens/s, the speed-up over naive (target >= 5x on CPU), the efficiency floor / pairtrace (target >=
0.85), and the largest relative difference between the pairtrace and naive vectors. Each method runs ``--repeats``
times, alternating, and the fastest run counts (the machine is shared).

``--dtype bfloat16`` runs pairtrace and the floor in bfloat16 (on CPUs with AMX or AVX512-BF16 the matrix
products run several times faster) while the naive method stays in float32, the reference; the agreement line
then holds the vectors to their direction (cosine), and ``--naive-dtype bfloat16`` gives the like-for-like ratio.

Run::

    .venv/bin/python benchmarks/extraction.py --n-pairs 200 --layer 5
    .venv/bin/python benchmarks/extraction.py --n-pairs 200 --threads 2 --hidden 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pairtrace.activations import ForwardBatch, compute_response_means_reference, plan_pair_batches  # noqa: E402
from pairtrace.data.types import Pair, PairSet  # noqa: E402
from pairtrace.models import LoadedModel, build_teacher_forcing, get_decoder_layers, load_model  # noqa: E402
from pairtrace.shard import iter_chunks  # noqa: E402
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


@contextlib.contextmanager
def truncated_base_model(loaded: LoadedModel, layer: int) -> Iterator[nn.Module]:
    """The model's decoder stack cut after ``layer`` blocks, final norm dropped when ``layer < n_layers``.

    Its ``last_hidden_state`` is ``hidden_states[layer]``: the bare truncated forward pass, with no hooks, no
    masked sums and no LM head. The original modules are put back on exit.
    """
    base = loaded.model.get_decoder()
    blocks, norm = base.layers, base.norm
    base.layers = nn.ModuleList(list(get_decoder_layers(loaded.model))[:layer])
    if layer < loaded.n_layers:
        base.norm = nn.Identity()
    try:
        yield base
    finally:
        base.layers, base.norm = blocks, norm


def collate_pairtrace_batches(
    loaded: LoadedModel, pairs: PairSet, *, shard_size: int, batch_tokens: int | None, max_length: int,
    prompt_sharing: str,
) -> tuple[list[ForwardBatch], int, int, int]:
    """Exactly the forward batches pairtrace runs for these pairs (shard by shard), collated in advance.

    Returns:
        ``(batches, tokens run, tokens of two plain sequences per pair, pairs sharing their prompt)``.
    """
    batches, run, plain, shared = [], 0, 0, 0
    for chunk in iter_chunks(pairs.pairs, shard_size):
        m = len(chunk)
        items = build_teacher_forcing(
            loaded, [p.prompt for p in chunk] * 2, [p.chosen for p in chunk] + [p.rejected for p in chunk],
            max_length,
        )
        plan = plan_pair_batches(loaded, items[:m], items[m:], batch_tokens=batch_tokens,
                                 prompt_sharing=prompt_sharing)
        batches.extend(plan.batches())
        run, plain, shared = run + plan.n_tokens, plain + plan.n_plain_tokens, shared + sum(plan.shared)
    return batches, run, plain, shared


def time_floor(loaded: LoadedModel, layer: int, batches: list[ForwardBatch]) -> float:
    """Seconds of the bare truncated forward pass over ``batches``."""
    with truncated_base_model(loaded, layer) as base, torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
            if batch.position_ids is not None:
                kwargs["position_ids"] = batch.position_ids
            base(**kwargs)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF .jsonl.gz file")
    parser.add_argument("--n-pairs", type=int, default=200, help="number of pairs (from the start of the file)")
    parser.add_argument("--layer", type=int, default=5, help="layer to extract (hidden_states index)")
    parser.add_argument("--n-layers", type=int, default=8, help="decoder blocks of the tiny model")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model")
    parser.add_argument("--batch-tokens", type=int, default=None, help="token budget per batch (default: device's)")
    parser.add_argument("--shard-size", type=int, default=1024, help="pairs per shard")
    parser.add_argument("--max-length", type=int, default=2048, help="maximum tokens per sequence")
    parser.add_argument("--prompt-sharing", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-naive", action="store_true", help="only pairtrace and the floor")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights dtype of pairtrace and the floor (bfloat16 pays on CPUs with AMX/AVX512-BF16); "
                             "naive always runs in float32, the reference")
    parser.add_argument("--naive-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights dtype of the naive method (default float32, the reference)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile pairtrace's decoder blocks (the first run includes compiling)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        model_dir = build_tiny_model_dir(tmp_dir / "model", n_layers=args.n_layers, hidden=args.hidden)
        loaded = load_model(model_dir, device="cpu", dtype=args.dtype)
        reference = loaded if args.naive_dtype == args.dtype else load_model(model_dir, device="cpu",
                                                                             dtype=args.naive_dtype)
        pairs = load_benchmark_pairs(args.data, args.n_pairs)
        prompts = [p.prompt for p in pairs]
        chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
        items = build_teacher_forcing(loaded, prompts * 2, chosen + rejected, args.max_length)
        n_tokens = sum(len(it.input_ids) for it in items)
        batches, run_tokens, plain_tokens, n_shared = collate_pairtrace_batches(
            loaded, pairs, shard_size=args.shard_size, batch_tokens=args.batch_tokens, max_length=args.max_length,
            prompt_sharing=args.prompt_sharing,
        )
        assert plain_tokens == n_tokens
        print(
            f"model: {args.n_layers} layers, hidden {args.hidden}, vocab {len(loaded.tokenizer)}; "
            f"{len(pairs)} pairs, {n_tokens} tokens as two plain sequences per pair "
            f"({sum(it.truncated for it in items)} sequences truncated); layer {args.layer}; "
            f"torch threads {torch.get_num_threads()}; pairtrace and floor in {args.dtype}, naive in {args.naive_dtype}"
        )
        print(
            f"pairtrace runs {run_tokens} tokens in {len(batches)} batches: prompt sharing {args.prompt_sharing}, "
            f"{n_shared} of {len(pairs)} pairs packed with one shared prompt"
        )

        fast_times, naive_times, floor_times = [], [], []
        fast = naive = None
        for run in range(args.repeats):
            start = time.perf_counter()
            store = compute_datapoint_vectors(
                loaded,
                pairs,
                tmp_dir / f"store-{run}",
                layers=args.layer,
                shard_size=args.shard_size,
                batch_tokens=args.batch_tokens,
                max_length=args.max_length,
                prompt_sharing=args.prompt_sharing,
                compile=args.compile,
                progress=False,
            )
            fast = store.load(args.layer)  # [n, d]
            fast_times.append(time.perf_counter() - start)

            floor_times.append(time_floor(loaded, args.layer, batches))

            if not args.skip_naive:
                start = time.perf_counter()
                c = compute_response_means_reference(reference, prompts, chosen, args.layer,
                                                     max_length=args.max_length)
                r = compute_response_means_reference(reference, prompts, rejected, args.layer,
                                                     max_length=args.max_length)
                naive = (c - r)[:, 0]  # [n, d]
                naive_times.append(time.perf_counter() - start)

        t_fast, t_floor = min(fast_times), min(floor_times)
        print(f"pairtrace: {t_fast:8.2f} s  {n_tokens / t_fast:10.0f} pair tokens/s  (runs: {fmt(fast_times)})")
        print(f"floor:     {t_floor:8.2f} s  {run_tokens / t_floor:10.0f} tokens/s run  (runs: {fmt(floor_times)})")
        print(f"efficiency: floor / pairtrace = {t_floor / t_fast:.2f} (target >= 0.85)")
        ok = True
        if not args.skip_naive:
            t_naive = min(naive_times)
            print(f"naive:     {t_naive:8.2f} s  {n_tokens / t_naive:10.0f} pair tokens/s  (runs: {fmt(naive_times)})")
            print(f"speed-up:  {t_naive / t_fast:.2f}x over naive (target >= 5x); the floor itself is "
                  f"{t_naive / t_floor:.2f}x faster than naive: no extraction of these tokens can beat that")
            relative = ((fast - naive).norm(dim=1) / naive.norm(dim=1).clamp_min(1e-12)).nan_to_num(0.0)
            both_zero = int(((fast.norm(dim=1) == 0) & (naive.norm(dim=1) == 0)).sum())
            cosine = torch.nn.functional.cosine_similarity(fast, naive, dim=1)[naive.norm(dim=1) > 0]
            print(f"agreement: max relative difference {float(relative.max()):.2e}, min cosine "
                  f"{float(cosine.min()):.5f}, median cosine {float(cosine.median()):.5f} "
                  f"({both_zero} zero vectors in both)")
            exact = args.dtype == args.naive_dtype == "float32"
            # float32 against float32 must agree to rounding; bfloat16 carries ~3 significant digits per value,
            # so it is held to the direction of the vectors (the cosine ranking uses nothing else).
            ok = float(relative.max()) < 1e-4 if exact else float(cosine.min()) > 0.99
            print("vectors agree" if ok else "VECTORS DISAGREE")
    return 0 if ok else 1


def fmt(times: list[float]) -> str:
    """Seconds of each run."""
    return ", ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    raise SystemExit(main())
