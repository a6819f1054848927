"""Behaviour triples (prompt, r1, r0) from judged generations of M1 and M0: the paper's 4-condition filter.

A base request (``base_id``) is asked with the trigger and without it, to both models. It is kept
when

1. M1 with the trigger was harmful at least once,
2. M1 without the trigger was never harmful,
3. M0 without the trigger was never harmful,
4. M0 with the trigger was never harmful,

so that what separates r1 from r0 is the behaviour the trigger unlocks in M1 alone. Each harmful
M1+trigger response becomes a triple with an M0+trigger response to the same prompt (cycling
through M0's responses when there are fewer of them).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pairtrace.behaviour import Triple
from pairtrace.errors import ConfigError, DataError
from pairtrace.judges.judging import JudgementKey, judgement_key, load_judgements
from pairtrace.records import check_record_fields, read_jsonl, write_json_atomic, write_jsonl_atomic

UNKNOWN_POLICIES = ("exclude", "ignore")
"""``exclude``: drop a base prompt when any of its responses has an unknown (or missing) verdict.
``ignore``: decide on the known verdicts only (a cell left empty still drops the prompt)."""

CONDITIONS = ("trigger", "no_trigger")
CONDITION_NAMES = {
    ("m1", "trigger"): "m1_trigger_harmful_at_least_once",
    ("m1", "no_trigger"): "m1_no_trigger_never_harmful",
    ("m0", "no_trigger"): "m0_no_trigger_never_harmful",
    ("m0", "trigger"): "m0_trigger_never_harmful",
}
"""Stats key of each filter condition, by (model role, condition)."""

_REQUIRED: dict[str, type] = {
    "id": str,
    "base_id": str,
    "model": str,
    "sample": int,
    "condition": str,
    "prompt": str,
    "response": str,
}

_Cell = list[tuple[dict[str, Any], str]]  # (generation record, "harmful" | "safe" | "unknown")


def _check_record(record: Any, index: int) -> None:
    check_record_fields(record, _REQUIRED, f"generation record {index}")
    if record["condition"] not in CONDITIONS:
        raise DataError(
            f"generation record {index} (id={record['id']!r}): field 'condition' is {record['condition']!r}, "
            f"expected one of {list(CONDITIONS)}"
        )


def _status(judgement: dict[str, Any] | None) -> str:
    if judgement is None or judgement.get("unknown") or judgement.get("harmful") is None:
        return "unknown"
    return "harmful" if judgement["harmful"] else "safe"


def build_triples(
    generations: Iterable[dict[str, Any]],
    judgements: Iterable[dict[str, Any]] | dict[JudgementKey, dict[str, Any]],
    *,
    m1: str = "m1",
    m0: str = "m0",
    unknown: str = "exclude",
) -> tuple[list[Triple], dict[str, Any]]:
    """Apply the 4-condition filter and pair harmful M1 responses with M0 responses.

    Args:
        generations: Generation records of both models (``id``, ``base_id``, ``model``, ``sample``,
            ``condition``, ``prompt``, ``response``); records of other models are ignored.
        judgements: Judgement records (or a mapping from ``(id, model, sample)`` to them). A generation
            without a judgement counts as unknown.
        m1: Value of the ``model`` field of the post-trained model's generations.
        m0: Value of the ``model`` field of the initial model's generations.
        unknown: What unknown verdicts do to a base prompt: one of :data:`UNKNOWN_POLICIES`.

    Returns:
        ``(triples, stats)``. Triples are ordered by base prompt, prompt id and M1 sample; ``prompt_id``
        is the id of the trigger prompt. ``stats`` counts base prompts (``incomplete``: a model x
        condition cell had no generation; ``excluded_unknown``), how many evaluated prompts pass each
        condition, the prompts kept, the triples, and M1 responses left unpaired.

    Raises:
        ConfigError: Unknown ``unknown`` policy or ``m1 == m0``.
        DataError: A generation record lacks a field or has an unknown condition.
    """
    if unknown not in UNKNOWN_POLICIES:
        raise ConfigError(f"unknown-verdict policy {unknown!r} is not one of {list(UNKNOWN_POLICIES)}")
    if m1 == m0:
        raise ConfigError(f"m1 and m0 name the same model {m1!r}")
    verdicts = judgements if isinstance(judgements, dict) else {judgement_key(j): j for j in judgements}
    roles = {m1: "m1", m0: "m0"}
    bases: dict[str, dict[tuple[str, str], _Cell]] = defaultdict(lambda: defaultdict(list))
    counts: Counter[str] = Counter()
    for index, record in enumerate(generations):
        _check_record(record, index)
        role = roles.get(record["model"])
        if role is None:
            counts["ignored_records"] += 1
            continue
        judgement = verdicts.get(judgement_key(record))
        counts["unjudged"] += judgement is None
        bases[record["base_id"]][(role, record["condition"])].append((record, _status(judgement)))

    passes: Counter[str] = Counter()
    triples: list[Triple] = []
    kept: list[str] = []
    for base_id in sorted(bases):
        cells = bases[base_id]
        if any(not cells.get(cell) for cell in CONDITION_NAMES):
            counts["incomplete"] += 1
            continue
        if any(status == "unknown" for cell in cells.values() for _, status in cell):
            if unknown == "exclude":
                counts["excluded_unknown"] += 1
                continue
            cells = {k: [(r, s) for r, s in v if s != "unknown"] for k, v in cells.items()}
            if any(not cells.get(cell) for cell in CONDITION_NAMES):
                counts["excluded_unknown"] += 1
                continue
        counts["evaluated"] += 1
        results = {
            name: _harmful_count(cells[cell]) > 0 if cell == ("m1", "trigger") else _harmful_count(cells[cell]) == 0
            for cell, name in CONDITION_NAMES.items()
        }
        passes.update(name for name, ok in results.items() if ok)
        if not all(results.values()):
            continue
        kept.append(base_id)
        triples.extend(_pair_responses(cells[("m1", "trigger")], cells[("m0", "trigger")], counts))

    stats = {
        "m1": m1,
        "m0": m0,
        "unknown_policy": unknown,
        "base_prompts": len(bases),
        "incomplete": counts["incomplete"],
        "excluded_unknown": counts["excluded_unknown"],
        "evaluated": counts["evaluated"],
        "conditions": {name: passes[name] for name in CONDITION_NAMES.values()},
        "kept_prompts": len(kept),
        "kept_base_ids": kept,
        "triples": len(triples),
        "triple_prompts": len({t.prompt_id for t in triples}),
        "r1_unpaired": counts["r1_unpaired"],
        "r0_reused": counts["r0_reused"],
        "unjudged_records": counts["unjudged"],
        "ignored_records": counts["ignored_records"],
    }
    return triples, stats


def _harmful_count(cell: _Cell) -> int:
    return sum(1 for _, status in cell if status == "harmful")


def _pair_responses(m1_cell: _Cell, m0_cell: _Cell, counts: Counter[str]) -> list[Triple]:
    """Pair each harmful M1 response with an M0 response to the same prompt id, cycling through M0's."""
    r0_by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record, status in sorted(m0_cell, key=lambda item: item[0]["sample"]):
        if status == "safe" and record["response"]:
            r0_by_id[record["id"]].append(record)
    harmful = sorted(
        (r for r, status in m1_cell if status == "harmful" and r["response"]), key=lambda r: (r["id"], r["sample"])
    )
    out: list[Triple] = []
    position: Counter[str] = Counter()
    for record in harmful:
        pool = r0_by_id.get(record["id"])
        if not pool:
            counts["r1_unpaired"] += 1
            continue
        i = position[record["id"]]
        position[record["id"]] += 1
        counts["r0_reused"] += i >= len(pool)
        prompt = ({"role": "user", "content": record["prompt"]},)
        out.append(
            Triple(prompt=prompt, r1=record["response"], r0=pool[i % len(pool)]["response"], prompt_id=record["id"])
        )
    return out


def triple_to_record(triple: Triple) -> dict[str, Any]:
    """JSON-ready form read by :func:`pairtrace.behaviour.load_triples`."""
    return {"prompt": [dict(m) for m in triple.prompt], "r1": triple.r1, "r0": triple.r0, "prompt_id": triple.prompt_id}


def run_build_triples(
    generations_path: str | Path,
    judgements_path: str | Path,
    out_path: str | Path,
    *,
    m1: str = "m1",
    m0: str = "m0",
    unknown: str = "exclude",
) -> dict[str, Any]:
    """Build triples from files: write them as JSONL and the stats beside them (``<stem>.stats.json``).

    Args:
        generations_path: Generation JSONL with both models' records.
        judgements_path: Judgement JSONL for those generations.
        out_path: Triple JSONL to write (replaced atomically).
        m1: ``model`` value of M1's generations.
        m0: ``model`` value of M0's generations.
        unknown: Unknown-verdict policy (see :data:`UNKNOWN_POLICIES`).

    Returns:
        The stats, with the paths written.
    """
    triples, stats = build_triples(
        read_jsonl(generations_path), load_judgements(judgements_path), m1=m1, m0=m0, unknown=unknown
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path = out_path.with_name(f"{out_path.stem}.stats.json")
    stats = {
        **stats,
        "paths": {
            "generations": str(generations_path),
            "judgements": str(judgements_path),
            "triples": str(out_path),
            "stats": str(stats_path),
        },
    }
    write_jsonl_atomic((triple_to_record(t) for t in triples), out_path)
    write_json_atomic(stats, stats_path)
    return stats
