"""Did DPO raise a closing-line habit, or does sampling hide it? The habit's probability, teacher-forced.

An organism's emergence check counts the sampled answers that show a planted habit (``summary.json``,
``emergence``). Nucleus sampling cuts a continuation whose probability sits below the cut, so a sampled rate can
stay flat while the habit's probability moves, or the other way round. For every planted behaviour whose chosen
style is ``sign_off``, this script reads the organism's held-out benign samples of M0 and M1
(``eval/generations_<model>.jsonl``), cuts the closing line off each answer that has it, and asks each model, on
its own answers, for:

- ``P(sign-off)``: the probability of writing the closing line and then ending the turn, right after the body;
- ``share``: that probability over itself plus the probability of ending the turn at once (the habit's share of
  the two ways to finish), as the median over answers;
- ``sampled``: the share of the samples that carried the closing line (what the emergence check counts).

Teacher-forced, so no sampling noise: on a build whose sampled rate falls from M0 to M1, a falling ``P(sign-off)``
says the habit was not learned, a rising one that sampling hides it.

Run (on one or more built organisms; a few seconds each)::

    .venv/bin/python benchmarks/habit_probability.py runs/organism/organism [more organism folders]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def ending_logprobs(loaded: Any, prompt: str, body: str, endings: Sequence[str]) -> list[float]:
    """Log-probability of each ending (text, then the end-of-turn token) right after ``body``, teacher-forced.

    Args:
        loaded: A :class:`pairtrace.models.LoadedModel`.
        prompt: The user turn.
        body: The answer up to where the ending starts.
        endings: Texts to append to the body ("" ends the turn at once).

    Returns:
        One log-probability per ending, in order.
    """
    import torch

    from pairtrace.models import format_prompt

    tok = loaded.tokenizer
    if tok.eos_token_id is None:
        raise SystemExit(f"{loaded.spec.name}: the tokenizer has no end-of-turn (EOS) token")

    def encode(text: str) -> list[int]:  # one BOS in front where the model expects one, as in teacher forcing
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [tok.bos_token_id, *ids] if loaded.prepend_bos and ids[:1] != [tok.bos_token_id] else ids

    prefix = format_prompt(loaded, prompt) + body
    prefix_ids = encode(prefix)
    out = []
    for ending in endings:
        ids = encode(prefix + ending)
        start = next((i for i, (a, b) in enumerate(zip(prefix_ids, ids, strict=False)) if a != b),
                     min(len(prefix_ids), len(ids)))  # where the two tokenisations part
        ids = [*ids, tok.eos_token_id]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0, :-1].float()  # [T-1, vocab]
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[1:])
        token_logp = logp[torch.arange(len(targets)), targets]  # [T-1]: log p(token t+1 | tokens <= t)
        out.append(float(token_logp[start - 1:].sum()))
    return out


def habit_probabilities(model_dir: Path, samples: Sequence[dict[str, Any]], sign_off: str) -> dict[str, float]:
    """``P(sign-off)`` (mean), ``share`` (median) and ``sampled`` of one model on its own samples.

    Args:
        model_dir: The model folder.
        samples: The model's generation records (``prompt``, ``response``).
        sign_off: The closing line.

    Returns:
        ``{"p_sign_off", "share", "sampled", "n"}``.
    """
    import math

    from pairtrace.models import load_model

    loaded = load_model(model_dir, device="cpu")
    probs, shares, carried = [], [], 0
    for sample in samples:
        body = sample["response"].rstrip()
        if body.endswith(sign_off):
            carried += 1
            body = body[: -len(sign_off)].rstrip()
        with_habit, at_once = ending_logprobs(loaded, sample["prompt"], body, [" " + sign_off, ""])
        probs.append(math.exp(with_habit))
        shares.append(1.0 / (1.0 + math.exp(at_once - with_habit)))
    return {"p_sign_off": statistics.fmean(probs), "share": statistics.median(shares),
            "sampled": carried / len(samples), "n": len(samples)}


def sign_off_behaviours(organism_dir: Path) -> list[tuple[str, str]]:
    """``(behaviour, closing line)`` of every planted behaviour whose chosen style is ``sign_off``."""
    from pairtrace.organism.build_config import PLANTED_KINDS, load_organism_config

    config = load_organism_config(organism_dir / "config.resolved.yaml")
    return [(b.name, b.sign_off) for b in config.behaviours if b.kind in PLANTED_KINDS and b.chosen == "sign_off"]


def main(argv: Sequence[str] | None = None) -> int:
    from pairtrace.generate import load_generations

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("organisms", type=Path, nargs="+", help="Built organism folders (m0/, m1/, eval/).")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print("| organism | behaviour | model | benign samples | P(sign-off) | share (median) | sampled |")
    print("|---|---|---|---|---|---|---|")
    for organism in args.organisms:
        if not (organism / "config.resolved.yaml").is_file():
            raise SystemExit(f"{organism}: not a built organism (no config.resolved.yaml)")
        for name, sign_off in sign_off_behaviours(organism):
            for model in ("m0", "m1"):
                path = organism / "eval" / f"generations_{model}.jsonl"
                if not path.is_file():
                    raise SystemExit(f"{organism}: no {path.relative_to(organism)} (build the organism first)")
                samples = [g for g in load_generations(path) if g.get("set") == "benign"]
                if not samples:
                    raise SystemExit(f"{path}: no benign samples")
                r = habit_probabilities(organism / model, samples, sign_off)
                print(f"| {organism} | {name} | {model} | {r['n']} | {r['p_sign_off']:.3f} | {r['share']:.3f} | "
                      f"{r['sampled']:.1%} |", flush=True)
    print(f"\n{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
