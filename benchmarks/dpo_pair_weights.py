"""How much does each slice of the mix weigh in DPO once M1 has learned it, kept and switched?

DPO's loss on a pair is −log σ(β·m), with m = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)) the margin of
the policy's log-ratios over the reference's (c chosen, r rejected). Its gradient is the gradient of m times
β·σ(−β·m): a pair the policy already prefers by a wide margin (β·m ≫ 0) weighs almost nothing, and the same pair
switched (chosen and rejected swapped, so its margin is −m) weighs almost β. Every pair of a slice that DPO has
learned well therefore counts many times more switched than kept. A random switch of a fraction f of the mix turns
about f of every slice around; if the slices that carry a behaviour are learned with wide margins, those few
switched pairs can outweigh the many kept ones, which is how a random switch cuts a behaviour that a random filter
of the same pairs leaves alone (docs/organism-results.md, "Why a random switch cut the behaviour").

This benchmark reads an organism folder (``m0``, ``m1`` with its ``dpo_summary.json``, ``data/preference_mix.jsonl``,
``data/labels.jsonl``), computes every pair's margin under M1 with M0 as the reference (the retrains' reference),
and prints per slice: the pairs, the median β·m, the mean DPO weight σ(−β·m) of a kept pair and σ(β·m) of a switched
one, their ratio, and the pull of the slice in a random switch of ``--fraction`` of the mix: the kept pairs' total
weight (1 − f)·Σσ(−β·m) against the switched pairs' f·Σσ(β·m) (expected values; a positive net pull still favours
what the slice teaches at M1). β is M1's recipe's unless ``--beta`` is given. About 2 minutes on a shared 2-core
CPU. Run::

    .venv/bin/python benchmarks/dpo_pair_weights.py runs/organism/organism
    .venv/bin/python benchmarks/dpo_pair_weights.py runs/organism/organism --beta 0.05 --out weights.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def compute_margins(m0, m1, pairs: Sequence[Any], max_length: int = 256, batch_size: int = 32) -> np.ndarray:
    """Every pair's DPO margin under ``m1`` with ``m0`` as the reference, in nats.

    Args:
        m0: The reference model (:class:`pairtrace.models.LoadedModel`), whose formatting encodes the pairs.
        m1: The policy (same tokenizer).
        pairs: :class:`pairtrace.data.types.Pair` records.
        max_length: Maximum tokens per teacher-forced sequence.
        batch_size: Pairs per forward pass.

    Returns:
        ``[n]`` margins m = (log π1(c) − log π0(c)) − (log π1(r) − log π0(r)).
    """
    from pairtrace.baselines.lora_warmup import compute_pair_logps, encode_pairs

    encoded = encode_pairs(m0, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                           max_length)
    pad_id = m0.tokenizer.pad_token_id
    ref, policy = (compute_pair_logps(m.model, encoded, pad_id, batch_size) for m in (m0, m1))  # [n, 2] each
    return ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])).double().numpy()


def summarise_slices(margins: np.ndarray, slices: Sequence[str], beta: float,
                     fraction: float) -> list[dict[str, Any]]:
    """Per slice: the DPO weights of its pairs kept and switched, and its pull in a random switch.

    Args:
        margins: ``[n]`` DPO margins (nats), in the order of ``slices``.
        slices: The slice of each pair.
        beta: DPO β.
        fraction: Share of the mix a random switch turns around.

    Returns:
        One row per slice, largest first: ``slice``, ``n``, ``median_beta_margin``, ``weight_kept`` and
        ``weight_switched`` (means of σ(−β·m) and σ(β·m)), ``ratio`` (switched over kept), ``pull_kept``
        ((1 − f)·Σσ(−β·m)), ``pull_switched`` (f·Σσ(β·m)) and ``net_pull`` (kept minus switched).
    """
    if len(margins) != len(slices):
        raise ValueError(f"{len(margins)} margins but {len(slices)} slices")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    scaled = beta * np.asarray(margins, dtype=np.float64)
    names = np.asarray(slices)
    rows = []
    for name in sorted(set(slices), key=lambda s: (-int((names == s).sum()), s)):
        x = scaled[names == name]
        kept, switched = 1.0 / (1.0 + np.exp(x)), 1.0 / (1.0 + np.exp(-x))  # σ(−βm), σ(βm)
        pull_kept, pull_switched = (1.0 - fraction) * kept.sum(), fraction * switched.sum()
        rows.append({"slice": name, "n": len(x), "median_beta_margin": float(np.median(x)),
                     "weight_kept": float(kept.mean()), "weight_switched": float(switched.mean()),
                     "ratio": float(switched.mean() / kept.mean()), "pull_kept": float(pull_kept),
                     "pull_switched": float(pull_switched), "net_pull": float(pull_kept - pull_switched)})
    return rows


def m1_recipe(organism: Path) -> dict[str, Any]:
    """The DPO recipe M1 was trained with (``m1/dpo_summary.json``)."""
    path = organism / "m1" / "dpo_summary.json"
    if not path.is_file():
        raise SystemExit(f"{organism}: no m1/dpo_summary.json (an organism folder built by pairtrace organism build)")
    return json.loads(path.read_text(encoding="utf-8"))["recipe"]


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from pairtrace.data.pairs import load_pairs
    from pairtrace.models import load_model
    from pairtrace.records import read_jsonl, write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("organism", type=Path, help="An organism folder (m0, m1, data/).")
    parser.add_argument("--beta", type=float, default=None, help="DPO β (default: M1's recipe's).")
    parser.add_argument("--fraction", type=float, default=0.08, help="Share of the mix a random switch turns.")
    parser.add_argument("--out", type=Path, default=None, help="Write the rows as JSON here.")
    args = parser.parse_args(argv)

    recipe = m1_recipe(args.organism)
    if recipe.get("loss_type", "sigmoid") != "sigmoid" and args.beta is None:
        raise SystemExit(f"M1 was trained with loss_type {recipe['loss_type']!r}; these weights are the sigmoid "
                         "loss's (give --beta to compute them anyway)")
    beta = recipe["beta"] if args.beta is None else args.beta
    data = args.organism / "data"
    pairs = load_pairs(data / "preference_mix.jsonl").pairs
    slice_of = {r["id"]: r["slice"] for r in read_jsonl(data / "labels.jsonl")}
    missing = [p.id for p in pairs if p.id not in slice_of]
    if missing:
        raise SystemExit(f"{data / 'labels.jsonl'}: no slice for pair {missing[0]} ({len(missing)} pairs)")
    margins = compute_margins(load_model(args.organism / "m0"), load_model(args.organism / "m1"), pairs,
                              max_length=int(recipe.get("max_length", 256)))
    rows = summarise_slices(margins, [slice_of[p.id] for p in pairs], beta, args.fraction)

    table = Table(title=f"{args.organism}: DPO weights under M1 (β = {beta}), random switch of "
                        f"{args.fraction:.0%}")
    for column in ("slice", "pairs", "median β·m", "weight kept", "weight switched", "switched / kept",
                   "pull kept", "pull switched", "net pull"):
        table.add_column(column, justify="left" if column == "slice" else "right")
    for r in rows:
        table.add_row(r["slice"], str(r["n"]), f"{r['median_beta_margin']:.2f}", f"{r['weight_kept']:.3f}",
                      f"{r['weight_switched']:.3f}", f"{r['ratio']:.1f}", f"{r['pull_kept']:.1f}",
                      f"{r['pull_switched']:.1f}", f"{r['net_pull']:.1f}")
    Console(width=160).print(table)
    if args.out is not None:
        write_json_atomic({"organism": str(args.organism), "beta": beta, "fraction": args.fraction, "slices": rows},
                          args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
