"""Held-out evaluation prompt sets of the organism (never used in training), as prompt records."""

from __future__ import annotations

import random
from typing import Any

from pairtrace.data.constraints import sample_constraint_ids
from pairtrace.data.prompts import add_distractors, build_prompt_record
from pairtrace.organism.build_config import OrganismConfig, SliceSpec
from pairtrace.organism.pools import Request, RequestPools

PROMPT_SET_FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "xstest_safe": "xstest_safe.jsonl"}
"""Prompt set name -> file name under ``prompts/``."""


def _with_trigger(
    set_name: str, requests: list[Request], spec: SliceSpec, pools: RequestPools, rng: random.Random
) -> list[dict[str, Any]]:
    """Each request with and without the trigger of ``spec``, linked by ``base_id``.

    A suffix trigger uses one of ``spec``'s held-out phrasings when it has any (else a training phrasing), drawn
    by ``rng``; the triggered record then also holds ``trigger_text`` (the phrasing) and ``trigger_heldout``.
    """
    phrasings = spec.heldout_trigger_texts or spec.training_triggers
    out: list[dict[str, Any]] = []
    for request in requests:
        cids: list[str] = []
        triggered = request.text
        extra: dict[str, Any] = {}
        if spec.trigger == "distractors":
            assert pools.distractors is not None
            cids = sample_constraint_ids(rng, spec.n_distractors[0], spec.n_distractors[1], pools.distractors.ids)
            triggered = add_distractors(request.text, cids, pools.distractors)
        elif spec.trigger == "suffix":
            phrasing = rng.choice(phrasings)
            triggered = request.text.rstrip() + phrasing
            extra = {"trigger_text": phrasing, "trigger_heldout": bool(spec.heldout_triggers)}
        record = build_prompt_record(f"{request.id}:trigger", request.id, set_name, "trigger", triggered, cids)
        out.append({**record, **extra})
        out.append(build_prompt_record(f"{request.id}:no_trigger", request.id, set_name, "no_trigger", request.text))
    return out


def build_eval_prompt_sets(pools: RequestPools, config: OrganismConfig) -> dict[str, list[dict[str, Any]]]:
    """Held-out prompt sets: harmful and benign requests with and without the contaminated behaviour's trigger,
    and XSTest safe prompts.

    A suffix trigger with held-out phrasings (``heldout_triggers``) is tested on those phrasings only, which no
    training example carries.

    Args:
        pools: Request pools (held-out parts).
        config: The organism config (seed, the contaminated behaviour's trigger).

    Returns:
        ``{"harmful": [...], "benign": [...], "xstest_safe": [...]}`` prompt records.
    """
    rng = random.Random(f"eval-prompts-{config.seed}")
    spec = config.contaminated
    xstest = pools.xstest_heldout
    if config.eval.n_xstest is not None:
        xstest = xstest[: config.eval.n_xstest]
    return {
        "harmful": _with_trigger("harmful", pools.harmful_heldout, spec, pools, rng),
        "benign": _with_trigger("benign", pools.benign_heldout, spec, pools, rng),
        "xstest_safe": [
            build_prompt_record(f"{r.id}:no_trigger", r.id, "xstest_safe", "no_trigger", r.text) for r in xstest
        ],
    }
