"""LLM-judge attribution baseline: rank pairs by how much more harmful the chosen response is than the rejected.

For every pair, a judge rates the chosen and the rejected response to the pair's last user turn on the 0-100
harmfulness rubric, and

    score(pair) = score(chosen) − score(rejected)      in [−100, 100]

so pairs that prefer a harmful answer over a harmless one come first. A judge that could not decide either side
gives the pair no score (NaN): it is counted in the metadata and ranks last, never treated as 0.

Judgements are cached in JSONL, one record per (pair id, side), appended as they arrive, so an interrupted run
resumes where it stopped. A cached record is reused only when it was made by the same judge for the same prompt
and response text (a SHA-256 of both is stored); unknown verdicts are re-asked on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pairtrace import __version__
from pairtrace.attribute import Ranking, build_ranking, pair_metadata_frame
from pairtrace.cost import CostMeter
from pairtrace.data.types import Pair, PairSet
from pairtrace.errors import DataError
from pairtrace.judges.base import Judge, Verdict
from pairtrace.judges.rubric import build_rubric_messages
from pairtrace.records import append_jsonl, read_jsonl, write_bytes_atomic

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
CacheKey = tuple[str, str]
"""``(pair id, side)``."""


def last_user_turn(pair: Pair) -> str:
    """The content of the pair's last user turn (what the judge is told the request was).

    Raises:
        DataError: The prompt has no user turn (names the pair and the field).
    """
    for message in reversed(pair.prompt):
        if message.get("role") == "user":
            return message.get("content", "")
    raise DataError(f"pair '{pair.id}' (row {pair.row}) field 'prompt': no user turn to show the judge")


def hash_item(prompt: str, response: str) -> str:
    """SHA-256 of a judged (prompt, response), stored with each cached judgement."""
    return hashlib.sha256(json.dumps([prompt, response], ensure_ascii=False).encode()).hexdigest()


def verdict_score(verdict: Verdict) -> float:
    """A verdict's 0-100 score: its rubric score, else 100/0 from the harmful flag, NaN when unknown."""
    if verdict.unknown:
        return math.nan
    if verdict.score is not None:
        return float(verdict.score)
    return 100.0 if verdict.harmful else 0.0


def estimate_tokens(text: str) -> int:
    """Rough token count of English text: one token per four characters (used when no counter is given)."""
    return max(1, math.ceil(len(text) / 4))


def load_judge_cache(path: str | Path, judge_name: str) -> dict[CacheKey, dict[str, Any]]:
    """Read cached judgements of ``judge_name`` keyed by (pair id, side); a later record for a key wins.

    Records of other judges are ignored; an unfinished last line (an interrupted write) is skipped.

    Raises:
        DataError: A line is not a JSON object or lacks ``id``, ``side``, ``judge``, ``item_sha256`` or ``unknown``.
    """
    path = Path(path)
    if not path.exists():
        return {}
    out: dict[CacheKey, dict[str, Any]] = {}
    for number, record in enumerate(read_jsonl(path, allow_torn_tail=True), start=1):
        for name in ("id", "side", "judge", "item_sha256", "unknown"):
            if name not in record:
                raise DataError(f"{path} record {number} (id={record.get('id')!r}): field '{name}' is missing")
        if record["judge"] == judge_name:
            out[(str(record["id"]), str(record["side"]))] = record
    return out


def _prepare_append(path: Path) -> None:
    """Create the cache's folder, and cut an unfinished last line so that appended records stay on their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        if fh.read(1) == b"\n":
            return
    data = path.read_bytes()  # rare: only after an interrupted write
    cut = data.rfind(b"\n") + 1
    logger.warning("%s: dropping an unfinished last line left by an interrupted run", path)
    write_bytes_atomic(data[:cut], path)


def _judge_calls(judge: Judge) -> int | None:
    counters = getattr(judge, "counters", None)
    if callable(counters):
        value = counters().get("calls")
        return int(value) if value is not None else None
    return None


def compute_llm_judge_ranking(pairs: PairSet | Sequence[Pair], judge: Judge, *, progress: bool = True,
                              cost: CostMeter | None = None, cache_path: str | Path | None = None,
                              batch_size: int = 64, judge_params: int | None = None,
                              count_tokens: Callable[[str], int] | None = None) -> Ranking:
    """Rank pairs by judged harmfulness of chosen minus rejected (see the module docstring).

    Args:
        pairs: The preference pairs.
        judge: Any :class:`~pairtrace.judges.base.Judge` (rule, classifier, OpenAI-compatible endpoint).
        progress: Show a progress bar over judgements.
        cost: Meter to count into (a new one named ``llm_judge`` otherwise); the record is also stored in the
            ranking's metadata under ``cost``.
        cache_path: JSONL file of judgements to reuse and append to (resumable); ``None`` = no cache.
        batch_size: Items handed to ``judge.judge_many`` at once (and appended to the cache after each batch).
        judge_params: The judge model's parameter count, for a FLOPs estimate (2·N·tokens); ``None`` = n/a.
        count_tokens: Token counter for the judge's prompts (e.g. its tokenizer's length); default: characters/4.

    Returns:
        The ranking, best-first; metadata holds the judge's name and counts of unknown verdicts, judged and
        cached items.

    Raises:
        DataError: A pair has no user turn, or the cache file is malformed.
    """
    pair_list = list(pairs)
    meter = cost if cost is not None else CostMeter("llm_judge")
    counter = count_tokens or estimate_tokens
    judge_name = getattr(judge, "name", type(judge).__name__)
    cache_file = Path(cache_path) if cache_path is not None else None
    with meter.measure():
        items: list[tuple[CacheKey, str, str, str]] = []  # (key, prompt, response, sha)
        for pair in pair_list:
            prompt = last_user_turn(pair)
            for side in SIDES:
                response = pair.chosen if side == "chosen" else pair.rejected
                items.append(((pair.id, side), prompt, response, hash_item(prompt, response)))
        cache = load_judge_cache(cache_file, judge_name) if cache_file is not None else {}
        verdicts: dict[CacheKey, Verdict] = {}
        n_stale = 0
        for key, _, _, sha in items:
            record = cache.get(key)
            if record is None:
                continue
            if record["item_sha256"] != sha:
                n_stale += 1
                continue
            if not record["unknown"]:
                verdicts[key] = Verdict(score=record.get("score"), harmful=record.get("harmful"),
                                        reason=record.get("reason", ""))
        n_cached = len(verdicts)
        todo = [it for it in items if it[0] not in verdicts]
        calls_before = _judge_calls(judge)
        tokens = 0
        if cache_file is not None and todo:
            _prepare_append(cache_file)
        with tqdm(total=len(todo), desc=f"judging pairs ({judge_name})", disable=not progress, unit="item") as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                results = judge.judge_many([(prompt, response) for _, prompt, response, _ in chunk])
                if len(results) != len(chunk):
                    raise DataError(f"judge '{judge_name}' returned {len(results)} verdicts for {len(chunk)} items")
                lines = []
                for (key, prompt, response, sha), verdict in zip(chunk, results, strict=True):
                    verdicts[key] = verdict
                    tokens += sum(counter(m["content"]) for m in build_rubric_messages(prompt, response))
                    lines.append({"id": key[0], "side": key[1], "judge": judge_name, "item_sha256": sha,
                                  **verdict.to_dict()})
                if cache_file is not None:
                    append_jsonl(lines, cache_file)
                bar.update(len(chunk))
        calls_after = _judge_calls(judge)
        calls = calls_after - calls_before if calls_before is not None and calls_after is not None else len(todo)
        meter.add_calls(calls, tokens=tokens, params=judge_params)
        meter.add_note(f"{len(todo)} judgements requested ({calls} model calls), {n_cached} from cache; "
                       f"prompt tokens {'counted' if count_tokens else 'estimated as characters/4'}"
                       + ("" if judge_params else "; judge size unknown: FLOPs n/a"))
        scores = np.full(len(pair_list), np.nan, dtype=np.float64)
        unknown = {side: 0 for side in SIDES}
        for i, pair in enumerate(pair_list):
            side_scores = {side: verdict_score(verdicts[(pair.id, side)]) for side in SIDES}
            for side, value in side_scores.items():
                unknown[side] += int(math.isnan(value))
            scores[i] = side_scores["chosen"] - side_scores["rejected"]
        metadata = {
            "kind": "ranking",
            "method": "llm_judge",
            "judge": judge_name,
            "score": "judge score (0-100) of chosen minus that of rejected",
            "dataset": {"fingerprint": getattr(pairs, "fingerprint", ""), "origin": getattr(pairs, "origin", ""),
                        "n_pairs": len(pair_list)},
            "n_unknown_chosen": unknown["chosen"],
            "n_unknown_rejected": unknown["rejected"],
            "n_judged": len(todo),
            "n_cached": n_cached,
            "n_stale_cache": n_stale,
            "pairtrace_version": __version__,
        }
        ranking = build_ranking([p.id for p in pair_list], scores, metadata,
                                pair_metadata=pair_metadata_frame(pair_list))
    ranking.metadata["cost"] = meter.record().to_dict()
    if ranking.metadata["n_nan"]:
        logger.warning("%d of %d pairs have an unknown judgement on at least one side: no score, ranked last",
                       ranking.metadata["n_nan"], len(ranking))
    return ranking
