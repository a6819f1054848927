"""Shared-prompt extraction vs the plain path, on pairs with long and short prompts, in one process.

Builds a tiny OLMo 2 model (random weights) and times ``compute_pair_means`` with ``prompt_sharing="always"``
(each pair packed as [prompt, chosen, rejected], the prompt computed once) against ``"never"`` (two sequences per
pair), on the same token ids:

1. HH-RLHF harmless-base pairs: multi-turn conversations, so the prompt is most of each sequence;
2. synthetic pairs whose prompt fraction P / (2P + C + R) is swept from 0.05 to 0.45 (fixed C + R), to show where
   sharing starts to pay and to ground the ``auto`` threshold (``DEFAULT_MIN_PROMPT_FRACTION``).

For each it prints tokens run, seconds, the speed-up shared / plain and the largest relative difference between
the two (target: <= 1e-5 in float32). Each setting runs ``--repeats`` times, alternating; the fastest counts.

Run::

    .venv/bin/python benchmarks/shared_prompt.py --threads 1
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from extraction import DEFAULT_DATA, load_benchmark_pairs  # noqa: E402
from pairtrace.activations import compute_pair_means, plan_pair_batches  # noqa: E402
from pairtrace.models import LoadedModel, TeacherForced, build_teacher_forcing, load_model  # noqa: E402
from pairtrace.shared_prompt import DEFAULT_MIN_PROMPT_FRACTION  # noqa: E402
from testing_utils import build_tiny_model_dir  # noqa: E402


def synthetic_items(
    n_pairs: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int = 0
) -> tuple[list[TeacherForced], list[TeacherForced]]:
    """Pairs of random token ids: prompt of ``prompt_tokens``, responses of ``response_tokens`` +- 25%."""
    rng = random.Random(seed)
    chosen, rejected = [], []
    for _ in range(n_pairs):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_tokens)]
        sides = []
        for _ in range(2):
            length = max(1, round(response_tokens * rng.uniform(0.75, 1.25)))
            response = [rng.randrange(3, vocab) for _ in range(length)]
            sides.append(TeacherForced(prompt + response, len(prompt), len(prompt) + len(response), False))
        chosen.append(sides[0])
        rejected.append(sides[1])
    return chosen, rejected


def compare(
    loaded: LoadedModel, chosen, rejected, layer: int, batch_tokens: int | None, repeats: int
) -> dict[str, float]:
    """Time both paths on the same items; return seconds, tokens and the largest relative difference."""
    times = {"always": [], "never": []}
    out = {}
    for _ in range(repeats):
        for mode in ("never", "always"):
            start = time.perf_counter()
            out[mode] = compute_pair_means(
                loaded, chosen, rejected, [layer], batch_tokens=batch_tokens, prompt_sharing=mode, progress=False
            )
            times[mode].append(time.perf_counter() - start)
    plan = plan_pair_batches(loaded, chosen, rejected, batch_tokens=batch_tokens, prompt_sharing="always")
    diffs = []
    for side in (0, 1):
        a, b = out["always"][side], out["never"][side]
        diffs.append(float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).nan_to_num(0.0).max()))
    return {
        "plain_s": min(times["never"]),
        "shared_s": min(times["always"]),
        "plain_tokens": plan.n_plain_tokens,
        "shared_tokens": plan.n_tokens,
        "max_rel_diff": max(diffs),
    }


def report(name: str, r: dict[str, float]) -> None:
    """One line per setting."""
    print(
        f"{name:34s} tokens {r['plain_tokens']:7d} -> {r['shared_tokens']:7d} "
        f"({1 - r['shared_tokens'] / r['plain_tokens']:4.0%} fewer)   plain {r['plain_s']:6.2f} s   "
        f"shared {r['shared_s']:6.2f} s   speed-up {r['plain_s'] / r['shared_s']:5.2f}x   "
        f"max rel diff {r['max_rel_diff']:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF .jsonl.gz file")
    parser.add_argument("--n-pairs", type=int, default=100, help="HH-RLHF pairs (from the start of the file)")
    parser.add_argument("--n-synthetic", type=int, default=48, help="synthetic pairs per prompt fraction")
    parser.add_argument("--response-tokens", type=int, default=96, help="mean synthetic response length")
    parser.add_argument("--n-layers", type=int, default=8, help="decoder blocks of the tiny model")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model")
    parser.add_argument("--layer", type=int, default=5, help="layer to extract")
    parser.add_argument("--batch-tokens", type=int, default=None, help="token budget per batch (default: device's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(build_tiny_model_dir(Path(tmp) / "model", n_layers=args.n_layers, hidden=args.hidden),
                            device="cpu")
        print(f"model: {args.n_layers} layers, hidden {args.hidden}; layer {args.layer}; "
              f"torch threads {torch.get_num_threads()}; auto threshold P/(2P+C+R) >= {DEFAULT_MIN_PROMPT_FRACTION}")
        compute_pair_means(loaded, *synthetic_items(4, 32, 32, len(loaded.tokenizer)), [args.layer],
                           progress=False)  # warm-up
        pairs = load_benchmark_pairs(args.data, args.n_pairs)
        m = len(pairs)
        items = build_teacher_forcing(
            loaded, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], 2048
        )
        fractions = [
            c.response_start / (len(c.input_ids) + len(r.input_ids)) for c, r in zip(items[:m], items[m:], strict=True)
        ]
        result = compare(loaded, items[:m], items[m:], args.layer, args.batch_tokens, args.repeats)
        report(f"HH-RLHF, {m} pairs (mean P frac {sum(fractions) / m:.2f})", result)
        worst = result["max_rel_diff"]
        total = args.response_tokens * 2
        for fraction in (0.05, 0.15, 0.25, 0.35, 0.45):
            prompt_tokens = max(1, round(fraction * total / (1 - 2 * fraction)))
            chosen, rejected = synthetic_items(args.n_synthetic, prompt_tokens, args.response_tokens,
                                               len(loaded.tokenizer), seed=int(fraction * 100))
            result = compare(loaded, chosen, rejected, args.layer, args.batch_tokens, args.repeats)
            report(f"synthetic, P frac {fraction:.2f} (P={prompt_tokens})", result)
            worst = max(worst, result["max_rel_diff"])
        print(f"largest relative difference shared vs plain: {worst:.1e} (target <= 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
