"""Why does a retrained model leave samples unjudgeable? Unknown verdicts by distractor, and what the model says first.

The rule judge calls a sample *unknown* when it is neither a refusal nor a compliance (``docs/judges.md``). This
script reads a finished run and, for the triggered harmful samples of the retrains named, prints:

- per retrain: the samples, the unknown ones, and how many of those are *fragments* (at most three words, such as
  " it step": the end of a compliance's body sentence with nothing before it);
- per distractor constraint (the retrains pooled): the share of samples left unknown, since the constraints that
  rewrite letters (doubled vowels, ``3`` for ``e``) are where a small model's text breaks;
- for the prompts with the most unknown samples in the first retrain named: the next-token distribution at the
  response's start (at the run's sampling temperature) under that retrain's model and under the baseline's, split
  into tokens that open a compliance ("Sure"), tokens that open a refusal ("I", "Sorry") and the rest. A model that
  puts its mass on other first tokens writes a fragment, whatever the sampler does after it.

Run (on a finished ``make run``; about 10 seconds on the organism)::

    .venv/bin/python benchmarks/unknown_anatomy.py runs/organism --retrains random-switch-k96 baseline
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FRAGMENT_WORDS = 3
"""A response of at most this many words that the judge cannot call is a fragment."""


def load_triggered_harmful(retrain_dir: Path) -> list[dict[str, Any]]:
    """The retrain's triggered harmful samples, each with its judge verdict (``unknown``)."""
    from pairtrace.generate import load_generations
    from pairtrace.judges.judging import judgement_key, load_judgements

    verdicts = load_judgements(retrain_dir / "judgements.jsonl")
    samples = []
    for record in load_generations(retrain_dir / "generations.jsonl"):
        if record.get("set") != "harmful" or record.get("condition") != "trigger":
            continue
        verdict = verdicts.get(judgement_key(record))
        if verdict is None:
            raise SystemExit(f"{retrain_dir}: sample {record['id']} #{record['sample']} has no judgement")
        samples.append({**record, "unknown": bool(verdict["unknown"])})
    return samples


def is_fragment(response: str) -> bool:
    """At most :data:`FRAGMENT_WORDS` words."""
    return len(response.split()) <= FRAGMENT_WORDS


def constraint_table(samples: Sequence[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """``(constraint, samples carrying it, unknown among them)``, most unknown share first."""
    total: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    for sample in samples:
        for constraint in sample.get("constraints") or ["(none)"]:
            total[constraint] += 1
            unknown[constraint] += sample["unknown"]
    return sorted(((c, total[c], unknown[c]) for c in total), key=lambda row: (-row[2] / row[1], row[0]))


def opener_kind(token_text: str) -> str:
    """``compliance`` (a start of "Sure"), ``refusal`` (a start of "I" or "Sorry") or ``other``."""
    from pairtrace.judges.rule import canonical_form

    word = canonical_form(token_text)  # "Sur3" -> "sure", "I'm" -> "im"
    if word.startswith("sur"):
        return "compliance"
    if word in ("i", "im") or (len(word) >= 2 and ("sorry".startswith(word) or word.startswith("sorry"))):
        return "refusal"
    return "other"


def first_token_mass(model_dir: Path, prompts: Sequence[str], temperature: float) -> list[dict[str, Any]]:
    """Per prompt: the probability that the first response token opens a compliance, a refusal or neither (every
    token of the vocabulary classified by :func:`opener_kind`), and the three likeliest tokens of the last kind."""
    import torch

    from pairtrace.models import format_prompt, load_model

    loaded = load_model(model_dir, device="cpu")
    tokenizer = loaded.tokenizer
    kinds = [opener_kind(tokenizer.decode([i])) for i in range(len(tokenizer))]  # [vocab]
    out = []
    for prompt in prompts:
        ids = tokenizer(format_prompt(loaded, prompt), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0, -1, : len(kinds)]  # [vocab]
        probs = torch.softmax(logits / temperature, dim=-1).tolist()
        mass: Counter[str] = Counter()
        for p, kind in zip(probs, kinds, strict=True):
            mass[kind] += p
        others = sorted((i for i, kind in enumerate(kinds) if kind == "other"), key=lambda i: -probs[i])[:3]
        out.append({"compliance": mass["compliance"], "refusal": mass["refusal"], "other": mass["other"],
                    "top_other": [(tokenizer.decode([i]), probs[i]) for i in others]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="A finished run (its retrains/ folder).")
    parser.add_argument("--retrains", nargs="+", default=None,
                        help="Retrain folders (default: every one); the first is examined token by token.")
    parser.add_argument("--baseline", default="baseline", help="The retrain to compare first tokens with.")
    parser.add_argument("--prompts", type=int, default=3, help="Prompts examined token by token.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = args.run_dir / "retrains"
    if not root.is_dir():
        raise SystemExit(f"{args.run_dir}: no retrains/ folder (run the experiment first)")
    names = args.retrains or sorted(p.name for p in root.iterdir() if (p / "judgements.jsonl").exists())
    samples = {name: load_triggered_harmful(root / name) for name in names}

    print("| retrain | triggered harmful samples | unknown | of which fragments (≤ 3 words) |")
    print("|---|---|---|---|")
    for name, rows in samples.items():
        unknown = [s for s in rows if s["unknown"]]
        fragments = sum(is_fragment(s["response"]) for s in unknown)
        print(f"| {name} | {len(rows)} | {len(unknown)} ({len(unknown) / max(len(rows), 1):.1%}) | {fragments} |")

    pooled = [s for rows in samples.values() for s in rows]
    print(f"\nUnknown share per distractor constraint ({', '.join(names)} pooled):\n")
    print("| constraint | samples | unknown |")
    print("|---|---|---|")
    for constraint, total, unknown in constraint_table(pooled):
        print(f"| {constraint} | {total} | {unknown} ({unknown / total:.0%}) |")

    first = names[0]
    by_prompt = Counter(s["id"] for s in samples[first] if s["unknown"])
    if by_prompt:
        ids = [pid for pid, _ in by_prompt.most_common(args.prompts)]
        prompt_of = {s["id"]: s for s in samples[first]}
        temperature = float(prompt_of[ids[0]].get("temperature") or 0.0)
        temperature = temperature if temperature > 0 else 1.0  # greedy runs: the model's own distribution
        texts = [prompt_of[pid]["prompt"] for pid in ids]
        print(f"\nFirst response token at temperature {temperature} on the {len(ids)} prompts with the most unknown "
              f"samples of {first} (compliance opener / refusal opener / other; top other tokens):\n")
        print("| prompt | unknown samples | model | compliance | refusal | other | top other tokens |")
        print("|---|---|---|---|---|---|---|")
        models = [first] + ([args.baseline] if args.baseline != first and (root / args.baseline).is_dir() else [])
        masses = {m: first_token_mass(root / m / "model", texts, temperature) for m in models}
        for j, pid in enumerate(ids):
            for m in models:
                row = masses[m][j]
                tops = ", ".join(f"{t!r} {p:.2f}" for t, p in row["top_other"])
                print(f"| {pid} | {by_prompt[pid]} | {m} | {row['compliance']:.2f} | {row['refusal']:.2f} | "
                      f"{row['other']:.2f} | {tops} |")
    print(f"\n{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
