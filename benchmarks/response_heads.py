"""How many preference pairs keep a direction under head pooling? Real pairs against the organism's.

With ``response_tokens = N`` a datapoint vector is the difference of the means over the chosen and the rejected
response's first N tokens. A pair whose two responses open with the same N tokens has no direction at that
pooling: it can be neither ranked nor clustered there. On the organism the openings are templated ("Sure, here
is" or one of four refusals), so this share says little about real data. This script measures it on real
preference pairs (HH-RLHF harmless-base test, shipped in the shared data folder) next to the organism's mix:

- the share of pairs whose chosen and rejected responses share their first N tokens, for the organism's
  byte-level BPE (2,048 tokens; finer than a 7B model's, so more tokens per word) and for whitespace words (a
  tokenizer-free proxy: a 100k-token vocabulary spends about 1.3 tokens per English word);
- how varied the openings are: the number of distinct first-N-word openings among the chosen responses.

Run (after ``make run``, which builds the organism)::

    .venv/bin/python benchmarks/response_heads.py
    .venv/bin/python benchmarks/response_heads.py --pairs my_pairs.jsonl --tokenizer path/to/model
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pairtrace.data.pairs import load_pairs
from pairtrace.data.paths import shared_data_dir

HEADS = (1, 2, 4, 8, 16)


def share_opening_alike(chosen: Sequence[list], rejected: Sequence[list], n: int) -> float:
    """Share of pairs whose two token lists agree on their first ``n`` items (identical lists included)."""
    same = sum(c[:n] == r[:n] for c, r in zip(chosen, rejected, strict=True))
    return same / max(len(chosen), 1)


def distinct_openings(responses: Sequence[list], n: int) -> int:
    """Number of distinct first-``n`` openings."""
    return len({tuple(r[:n]) for r in responses})


def measure(name: str, path: Path, tokenize: Callable[[list[str]], list[list]], label: str) -> list[str]:
    """Markdown rows for one dataset and one tokenisation."""
    pairs = list(load_pairs(path))
    chosen = tokenize([p.chosen for p in pairs])
    rejected = tokenize([p.rejected for p in pairs])
    shares = " | ".join(f"{share_opening_alike(chosen, rejected, n):.1%}" for n in HEADS)
    openings = " | ".join(str(distinct_openings(chosen, n)) for n in HEADS)
    return [f"| {name} | {len(pairs)} | {label} | {shares} | {openings} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, nargs="*",
                        help="Preference pair files (default: HH-RLHF harmless-base test and the organism's mix).")
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/organism/organism/m0"),
                        help="A saved model folder whose tokenizer to use (default: the organism's M0).")
    args = parser.parse_args()
    started = time.perf_counter()
    datasets = {p.name: p for p in args.pairs} if args.pairs else {
        "HH-RLHF harmless-base test": shared_data_dir() / "hh_rlhf_harmless_base_test.jsonl.gz",
        "organism mix": Path("runs/organism/organism/data/preference_mix.jsonl"),
    }
    tokenizers: dict[str, Callable[[list[str]], list[list]]] = {"words": lambda texts: [t.split() for t in texts]}
    if (args.tokenizer / "tokenizer.json").exists() or (args.tokenizer / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenizers[f"tokens ({args.tokenizer.name}, vocab {len(tok)})"] = (
            lambda texts: tok(texts, add_special_tokens=False)["input_ids"])
    else:
        print(f"no tokenizer at {args.tokenizer}: words only")
    alike = " | ".join(f"alike, N = {n}" for n in HEADS)
    openings = " | ".join(f"openings, N = {n}" for n in HEADS)
    print("alike: share of pairs whose chosen and rejected responses open with the same N units (no direction under "
          "head pooling); openings: distinct first-N openings of the chosen responses.\n")
    print(f"| dataset | pairs | unit | {alike} | {openings} |")
    print("|---|---|---|" + "---|" * (2 * len(HEADS)))
    for name, path in datasets.items():
        if not path.exists():
            print(f"| {name} | missing: {path} |")
            continue
        for label, tokenize in tokenizers.items():
            for row in measure(name, path, tokenize, label):
                print(row)
    print(f"\n{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
