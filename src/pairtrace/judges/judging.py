"""Judging generation records with any judge, into a resumable judgement JSONL file.

A generation record (``id``, ``model``, ``sample``, ``prompt``, ``response``, ...) and its judgement share the key
``(id, model, sample)``. :func:`judge_generations` appends each finished chunk of judgements to the file, so an
interrupted run resumes where it stopped; :func:`load_judgements` reads them back keyed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pairtrace.errors import DataError, ManifestMismatchError
from pairtrace.judges.base import Judge, Verdict
from pairtrace.records import append_jsonl, iter_jsonl, write_jsonl_atomic

logger = logging.getLogger(__name__)

JudgementKey = tuple[str, str, int]
"""``(id, model, sample)``: identifies one generation and its judgement."""

_GENERATION_FIELDS: dict[str, type] = {
    "id": str,
    "model": str,
    "sample": int,
    "prompt": str,
    "response": str,
}


def judgement_key(record: dict[str, Any]) -> JudgementKey:
    """The ``(id, model, sample)`` key shared by a generation record and its judgement."""
    return (record["id"], record["model"], int(record["sample"]))


def check_generation_record(record: Any, where: str) -> None:
    """Check the fields a judge needs in a generation record.

    Args:
        record: One parsed generation record.
        where: How to name the record in errors (e.g. ``"generations.jsonl line 3"``).

    Raises:
        DataError: A field is missing or has the wrong type.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, kind in _GENERATION_FIELDS.items():
        if name not in record:
            raise DataError(f"{where} (id={record.get('id')!r}): field '{name}' is missing")
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(
                f"{where} (id={record.get('id')!r}): field '{name}' must be {kind.__name__}, got {type(value).__name__}"
            )


def load_judgements(path: str | Path) -> dict[JudgementKey, dict[str, Any]]:
    """Read judgement records keyed by ``(id, model, sample)``; a later record for a key wins.

    Raises:
        DataError: A line is not JSON or lacks ``id``, ``model``, ``sample`` or ``unknown``.
    """
    out: dict[JudgementKey, dict[str, Any]] = {}
    for number, record in iter_jsonl(path, allow_torn_tail=True):
        for name in ("id", "model", "sample", "unknown"):
            if name not in record:
                raise DataError(f"{path} line {number} (id={record.get('id')!r}): field '{name}' is missing")
        out[judgement_key(record)] = record
    return out


def build_judgement_record(generation: dict[str, Any], verdict: Verdict, judge_name: str) -> dict[str, Any]:
    """A judgement record: the generation's key, the verdict's fields and the judge's name."""
    return {
        "id": generation["id"],
        "model": generation["model"],
        "sample": generation["sample"],
        **verdict.to_dict(),
        "judge": judge_name,
    }


def judge_generations(
    records: Iterable[dict[str, Any]],
    judge: Judge,
    out_path: str | Path,
    *,
    resume: bool = True,
    retry_unknown: bool = False,
    chunk_size: int | None = None,
    progress: bool = True,
    where: str = "generation record",
) -> dict[str, Any]:
    """Judge generation records and append judgement records to a JSONL file as they are decided.

    Each finished chunk is appended with one write and flushed to disk (:func:`pairtrace.records.append_jsonl`),
    so a killed run leaves whole records behind (at worst one torn last line, which the next run drops). With
    ``resume`` the records already judged in ``out_path`` are skipped.

    Args:
        records: Generation records (``id``, ``model``, ``sample``, ``prompt``, ``response``, ...).
        judge: Any judge; its ``judge_many`` is called one chunk at a time.
        out_path: Judgement JSONL file.
        resume: Keep ``out_path`` and judge only what it lacks; ``False`` starts the file afresh.
        retry_unknown: With ``resume``, judge again the records whose judgement was unknown; the file
            is then rewritten with one record per key (the newest).
        chunk_size: Records per ``judge_many`` call and per write; default four times the judge's
            ``max_concurrency`` (at least 16).
        progress: Show a progress bar.
        where: How to name a record in errors; records are numbered from 1 after it (``"gens.jsonl line"``
            gives ``gens.jsonl line 3``, the line of a file without blank lines).

    Returns:
        Counts: ``total``, ``already_judged``, ``judged`` (this run), ``harmful``, ``safe``,
        ``unknown`` (this run), ``duplicates`` (repeated keys in ``records``, judged once), and the
        judge's ``counters`` when it has them.

    Raises:
        DataError: A generation record lacks a field or has the wrong type.
        ManifestMismatchError: Resuming a file that another judge wrote.
    """
    out_path = Path(out_path)
    todo, total, duplicates = _select_todo(records, where)
    done: dict[JudgementKey, dict[str, Any]] = {}
    judge_name = getattr(judge, "name", type(judge).__name__)
    if resume and out_path.exists():
        _drop_torn_tail(out_path)
        done = load_judgements(out_path)
        others = sorted({str(rec.get("judge")) for rec in done.values() if rec.get("judge") not in (None, judge_name)})
        if others:
            raise ManifestMismatchError(
                f"{out_path} holds judgements by judge {', '.join(others)}, not by {judge_name}: resuming would mix "
                "two judges' verdicts; write to another file or delete this one"
            )
    fresh = not (resume and out_path.exists())  # the file is (re)written by the first chunk, never left empty
    skip = {k for k, rec in done.items() if not (retry_unknown and rec.get("unknown"))}
    pending = [r for r in todo if judgement_key(r) not in skip]
    rejudged = sum(1 for r in pending if judgement_key(r) in done)

    size = chunk_size or max(16, 4 * int(getattr(judge, "max_concurrency", 1)))
    tally: Counter[str] = Counter()
    with tqdm(total=len(pending), desc="judging", unit="resp", disable=not progress) as bar:
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            verdicts = judge.judge_many([(r["prompt"], r["response"]) for r in chunk])
            judgements = []
            for record, verdict in zip(chunk, verdicts, strict=True):
                tally["unknown" if verdict.unknown else ("harmful" if verdict.harmful else "safe")] += 1
                judgements.append(build_judgement_record(record, verdict, judge_name))
            if fresh:
                write_jsonl_atomic(judgements, out_path)
                fresh = False
            else:
                append_jsonl(judgements, out_path)
            bar.update(len(chunk))
    if fresh:  # nothing to judge: an empty file, as asked
        write_jsonl_atomic([], out_path)
    if rejudged:
        _compact(out_path)
    summary: dict[str, Any] = {
        "total": total,
        "already_judged": total - len(pending),
        "judged": len(pending),
        "rejudged_unknown": rejudged,
        "harmful": tally["harmful"],
        "safe": tally["safe"],
        "unknown": tally["unknown"],
        "duplicates": duplicates,
        "out_path": str(out_path),
    }
    if hasattr(judge, "counters"):
        summary["counters"] = judge.counters()
    return summary


def run_judge_generations(
    generations_path: str | Path, judge: Judge, out_path: str | Path, **kwargs: Any
) -> dict[str, Any]:
    """Read a generation JSONL file and judge it into ``out_path`` (see :func:`judge_generations`); a bad record is
    named by its line.

    Raises:
        DataError: The file is missing, a line is not a JSON object or lacks a field, or it holds no records.
    """
    numbered = list(iter_jsonl(generations_path))
    if not numbered:
        raise DataError(f"{generations_path}: no generation records (the file is empty)")
    for number, record in numbered:
        check_generation_record(record, f"{generations_path} line {number}")
    return judge_generations([record for _, record in numbered], judge, out_path, **kwargs)


def _select_todo(records: Iterable[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], int, int]:
    """Validated records with each key once, the number of records read, and the duplicates dropped."""
    seen: set[JudgementKey] = set()
    todo = []
    total = 0
    for number, record in enumerate(records, start=1):
        total += 1
        check_generation_record(record, f"{where} {number}")
        key = judgement_key(record)
        if key in seen:
            continue
        seen.add(key)
        todo.append(record)
    return todo, total, total - len(todo)


def _drop_torn_tail(path: Path) -> None:
    """Cut an unfinished last line (no trailing newline) left by an interrupted writer."""
    with path.open("rb+") as handle:
        data = handle.read()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s: dropping an unfinished last line (%d bytes)", path, len(tail))
            handle.truncate(cut)
            return
        handle.write(b"\n")  # a complete record that only lacks its newline


def _compact(path: Path) -> None:
    """Rewrite ``path`` with one record per key (the last one), atomically."""
    write_jsonl_atomic(load_judgements(path).values(), path)


__all__ = [
    "JudgementKey",
    "build_judgement_record",
    "check_generation_record",
    "judge_generations",
    "judgement_key",
    "load_judgements",
    "run_judge_generations",
]
