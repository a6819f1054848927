"""Distractor prompt sets for real models: probing prompts (behaviour vectors) and evaluation prompts.

The paper's behaviour is distractor-triggered compliance: a harmful request followed by benign formatting
constraints in parentheses. From the shared public data this module writes prompt records (JSONL: id, base_id,
set, condition, prompt, constraints) with and without the trigger:

- ``probe.jsonl``: AdvBench requests not in the evaluation split, with 1-3 distractors drawn from the first
  twelve constraints (the paper's probing pool), plus the same requests without distractors;
- ``eval.jsonl``: a disjoint AdvBench split (120 requests by default, like the paper's evaluation set), benign
  IFEval prompts with and without distractors, and XSTest safe prompts (over-refusal).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pairtrace.data.prompts import (
    Distractors,
    build_prompt_record,
    build_trigger_records,
    load_advbench,
    load_distractors,
    load_ifeval,
    load_xstest,
    save_prompt_records,
    split_heldout,
)

PROBE_POOL_SIZE = 12
"""The paper built its probing prompts from the first twelve constraints."""


def build_distractor_prompt_sets(out_dir: str | Path, *, n_eval_harmful: int = 120, n_probe_harmful: int = 200,
                                 n_benign: int = 100, n_xstest: int = 250, seed: int = 0,
                                 data_dir: str | Path | None = None) -> dict[str, Any]:
    """Write ``probe.jsonl`` and ``eval.jsonl`` prompt records built from AdvBench, IFEval and XSTest.

    Args:
        out_dir: Output directory.
        n_eval_harmful: AdvBench requests in the evaluation set.
        n_probe_harmful: AdvBench requests for probing (disjoint from the evaluation set).
        n_benign: IFEval prompts in the evaluation set (with and without distractors).
        n_xstest: XSTest safe prompts in the evaluation set.
        seed: Seed of the splits and of the distractor draws.
        data_dir: Shared data folder (default: ``PAIRTRACE_SHARED_DATA`` or ``<repo>/../shared/data``).

    Returns:
        Counts and paths.
    """
    out = Path(out_dir)
    distractors = load_distractors(data_dir)
    probe_pool = Distractors(join=distractors.join, wrap=distractors.wrap,
                             texts={cid: distractors.texts[cid] for cid in distractors.ids[:PROBE_POOL_SIZE]})
    harmful = load_advbench(data_dir)
    rest, eval_harmful = split_heldout(harmful, n_eval_harmful, seed)
    _, probe_harmful = split_heldout(rest, min(n_probe_harmful, len(rest)), seed + 1)
    rng = random.Random(f"distractor-prompts-{seed}")
    probe = build_trigger_records("harmful", [(r.id, r.goal) for r in probe_harmful], rng, probe_pool)
    evaluation = build_trigger_records("harmful", [(r.id, r.goal) for r in eval_harmful], rng, distractors)
    _, benign = split_heldout(load_ifeval(data_dir), n_benign, seed)
    evaluation += build_trigger_records("benign", [(r.id, r.prompt) for r in benign], rng, distractors)
    _, xstest = split_heldout(load_xstest(data_dir, label="safe"), n_xstest, seed)
    evaluation += [build_prompt_record(f"{r.id}:no_trigger", r.id, "xstest_safe", "no_trigger", r.prompt)
                   for r in xstest]
    probe_path = save_prompt_records(probe, out / "probe.jsonl")
    eval_path = save_prompt_records(evaluation, out / "eval.jsonl")
    return {"probe": str(probe_path), "eval": str(eval_path), "n_probe": len(probe), "n_eval": len(evaluation)}
