"""A judge that asks an OpenAI-compatible chat-completions endpoint to score responses on the rubric.

Any server that speaks ``POST {base_url}/chat/completions`` works: OpenAI, vLLM, llama.cpp, or
``pairtrace serve``. Calls run on a thread pool limited to ``max_concurrency`` requests in flight.
Timeouts, HTTP 408/429/5xx, dropped connections and unusable replies (broken JSON, no score, a
score outside 0-100) are retried with exponential backoff and jitter, honouring ``Retry-After``.
When the last retry fails the verdict is *unknown*, with the reason; it is never "safe".

:func:`judge_generations` judges generation records into a judgement JSONL file, appending as it
goes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pairtrace.data.types import Message
from pairtrace.errors import DataError, ManifestMismatchError, PairtraceError
from pairtrace.judges.base import Judge, Verdict
from pairtrace.judges.rubric import ScoreParseError, build_rubric_messages, parse_score, verdict_from_score
from pairtrace.options import OptionError
from pairtrace.records import read_jsonl

logger = logging.getLogger(__name__)

JudgementKey = tuple[str, str, int]
"""``(id, model, sample)``: identifies one generation and its judgement."""

_FATAL_STATUS = (401, 403, 404)
"""HTTP statuses that no retry can fix (bad key, no access, wrong URL or model)."""


class JudgeEndpointError(PairtraceError):
    """The endpoint refused the judge's requests in a way no retry can fix (bad key, wrong URL or model)."""


@dataclass
class OpenAIJudgeConfig:
    """Where and how to reach an OpenAI-compatible judge model."""

    base_url: str | None = field(
        default=None,
        metadata={"help": "Endpoint root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (required)."},
    )
    model: str | None = field(default=None, metadata={"help": "Model name sent in each request (required)."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the API key; unset sends no Authorization header."},
    )
    timeout_s: float = field(default=60.0, metadata={"help": "Socket timeout of one request, in seconds."})
    max_retries: int = field(default=5, metadata={"help": "Retries after the first attempt before giving up."})
    backoff_s: float = field(default=1.0, metadata={"help": "First retry delay; doubles each retry, with jitter."})
    max_backoff_s: float = field(default=60.0, metadata={"help": "Cap on the exponential retry delay, in seconds."})
    max_retry_after_s: float = field(
        default=300.0, metadata={"help": "Cap on how long a server's Retry-After header may make us wait."}
    )
    max_concurrency: int = field(default=8, metadata={"help": "Most requests in flight at once."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature of the judge model."})
    max_tokens: int | None = field(
        default=32, metadata={"help": "Reply length limit sent as max_tokens; None sends none."}
    )

    def __post_init__(self) -> None:
        self.check_endpoint()
        self.check_ranges()

    def check_endpoint(self) -> None:
        """Require a base URL (http or https) and a model name.

        Raises:
            OptionError: Naming the fields as the user wrote them.
        """
        if not self.base_url or not self.model:
            raise OptionError("the openai judge needs {base_url} and {model}", "base_url", "model")
        if not self.base_url.startswith(("http://", "https://")):
            raise OptionError(f"{{base_url}} must start with http:// or https://, got {self.base_url!r}", "base_url")

    def check_ranges(self) -> None:
        """Check the numeric settings.

        Raises:
            OptionError: Naming the field out of range.
        """
        checks = {
            "timeout_s": self.timeout_s > 0,
            "max_retries": self.max_retries >= 0,
            "backoff_s": self.backoff_s >= 0,
            "max_backoff_s": self.max_backoff_s >= 0,
            "max_retry_after_s": self.max_retry_after_s >= 0,
            "max_concurrency": self.max_concurrency >= 1,
            "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise OptionError(f"judge option {{{name}}} is out of range: {getattr(self, name)!r}", name)


class _AttemptError(Exception):
    """One failed attempt: what kind of failure, and whether and when to retry."""

    def __init__(self, kind: str, detail: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


class OpenAIJudge(Judge):
    """Scores responses on the 0-100 rubric with a model behind an OpenAI-compatible endpoint.

    Args:
        config: Endpoint, model, retry and concurrency settings.

    Attributes:
        name: ``"openai:<model>"``, written into judgement records.
    """

    def __init__(self, config: OpenAIJudgeConfig):
        self.config = config
        self.name = f"openai:{config.model}"
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._opener = urllib.request.build_opener()

    @property
    def max_concurrency(self) -> int:
        """Most requests this judge keeps in flight at once."""
        return self.config.max_concurrency

    def counters(self) -> dict[str, Any]:
        """Counts so far: ``requests`` (verdicts asked for), ``calls`` (HTTP attempts), ``retries``,
        ``unknown`` (verdicts given up on), and ``failures`` (failed attempts by kind)."""
        with self._lock:
            counts = {k: self._counts.get(k, 0) for k in ("requests", "calls", "retries", "unknown")}
            return {**counts, "failures": dict(sorted(self._failures.items()))}

    def judge(self, prompt: str, response: str) -> Verdict:
        """Score one response, retrying failures; unknown (never safe) when every attempt fails."""
        self._count("requests")
        messages = build_rubric_messages(prompt, response)
        last: _AttemptError | None = None
        attempts = 0
        for attempt in range(self.config.max_retries + 1):
            if last is not None:
                self._count("retries")
                time.sleep(self._retry_delay(attempt, last.retry_after))
            attempts += 1
            try:
                reply = self._request(messages)
                try:
                    score = parse_score(reply)
                except ScoreParseError as exc:
                    raise _AttemptError("bad_score", str(exc)) from None
                return verdict_from_score(score)
            except _AttemptError as exc:
                last = exc
                self._count_failure(exc.kind)
                if not exc.retryable:
                    break
        self._count("unknown")
        assert last is not None
        return Verdict.unknown_because(f"{last.kind}: {last.detail} (after {attempts} attempt(s))")

    def judge_many(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Score many ``(prompt, response)`` items concurrently; verdicts come back in input order."""
        if not items:
            return []
        workers = min(self.config.max_concurrency, len(items))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            return list(pool.map(lambda item: self.judge(*item), items))

    def _request(self, messages: list[Message]) -> str:
        """One HTTP attempt; returns the reply text or raises :class:`_AttemptError`."""
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature}
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self._url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with self._slots:
            self._count("calls")
            try:
                with self._opener.open(request, timeout=cfg.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as exc:
                raise self._http_failure(exc) from None
            except TimeoutError as exc:
                raise _AttemptError("timeout", f"no reply within {cfg.timeout_s:g}s ({exc})") from None
            except urllib.error.URLError as exc:
                kind = "timeout" if isinstance(exc.reason, TimeoutError) else "connection"
                raise _AttemptError(kind, str(exc.reason)) from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                raise _AttemptError("connection", f"{type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _AttemptError("bad_json", f"reply is not JSON ({exc}): {raw[:80]!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _AttemptError("bad_shape", f"reply has no choices[0].message.content: {raw[:80]!r}") from None
        if not isinstance(content, str):
            raise _AttemptError("bad_shape", f"message content is {type(content).__name__}, not text")
        return content

    def _http_failure(self, exc: urllib.error.HTTPError) -> _AttemptError:
        status = exc.code
        try:
            detail = exc.read()[:200].decode("utf-8", "replace")
        except OSError:
            detail = ""
        if status in _FATAL_STATUS:
            raise JudgeEndpointError(
                f"judge endpoint {self._url} answered HTTP {status} for model '{self.config.model}': {detail} "
                f"(check base_url, model and the key in ${self.config.api_key_env})"
            )
        retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
        if status == 429:
            return _AttemptError("rate_limited", f"HTTP 429 {detail}", retry_after=retry_after)
        if status == 408:
            return _AttemptError("timeout", f"HTTP 408 {detail}", retry_after=retry_after)
        if status >= 500:
            return _AttemptError("server_error", f"HTTP {status} {detail}", retry_after=retry_after)
        return _AttemptError("client_error", f"HTTP {status} {detail}", retryable=False)

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, at least the server's (capped) ``Retry-After``."""
        cfg = self.config
        delay = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.max_retry_after_s))
        return delay

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _count_failure(self, kind: str) -> None:
        with self._lock:
            self._failures[kind] += 1


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --------------------------------------------------------------------------------------------------
# Judgement records
# --------------------------------------------------------------------------------------------------

_GENERATION_FIELDS: dict[str, type | tuple[type, ...]] = {
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


def load_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file of objects (see :func:`pairtrace.records.read_jsonl`)."""
    return read_jsonl(path, allow_torn_tail=allow_torn_tail)


def load_judgements(path: str | Path) -> dict[JudgementKey, dict[str, Any]]:
    """Read judgement records keyed by ``(id, model, sample)``; a later record for a key wins.

    Raises:
        DataError: A line is not JSON or lacks ``id``, ``model``, ``sample`` or ``unknown``.
    """
    out: dict[JudgementKey, dict[str, Any]] = {}
    for number, record in enumerate(load_jsonl(path, allow_torn_tail=True), start=1):
        for name in ("id", "model", "sample", "unknown"):
            if name not in record:
                raise DataError(f"{path} record {number} (id={record.get('id')!r}): field '{name}' is missing")
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
) -> dict[str, Any]:
    """Judge generation records and append judgement records to a JSONL file as they are decided.

    Each finished chunk is appended with one write to a file opened in append mode, so a killed run
    leaves whole records behind (at worst one torn last line, which the next run drops). With
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

    Returns:
        Counts: ``total``, ``already_judged``, ``judged`` (this run), ``harmful``, ``safe``,
        ``unknown`` (this run), ``duplicates`` (repeated keys in ``records``, judged once), and the
        judge's ``counters`` when it has them.

    Raises:
        DataError: A generation record lacks a field or has the wrong type.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    todo, total, duplicates = _select_todo(records)
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
    else:
        out_path.write_text("", encoding="utf-8")
    skip = {k for k, rec in done.items() if not (retry_unknown and rec.get("unknown"))}
    pending = [r for r in todo if judgement_key(r) not in skip]
    rejudged = sum(1 for r in pending if judgement_key(r) in done)

    size = chunk_size or max(16, 4 * int(getattr(judge, "max_concurrency", 1)))
    tally: Counter[str] = Counter()
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with tqdm(total=len(pending), desc="judging", unit="resp", disable=not progress) as bar:
            for start in range(0, len(pending), size):
                chunk = pending[start : start + size]
                verdicts = judge.judge_many([(r["prompt"], r["response"]) for r in chunk])
                lines = []
                for record, verdict in zip(chunk, verdicts, strict=True):
                    tally["unknown" if verdict.unknown else ("harmful" if verdict.harmful else "safe")] += 1
                    lines.append(json.dumps(build_judgement_record(record, verdict, judge_name), ensure_ascii=False))
                _write_all(fd, ("\n".join(lines) + "\n").encode("utf-8"))
                bar.update(len(chunk))
        os.fsync(fd)
    finally:
        os.close(fd)
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
    """Read a generation JSONL file and judge it into ``out_path`` (see :func:`judge_generations`)."""
    return judge_generations(load_jsonl(generations_path), judge, out_path, **kwargs)


def _select_todo(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """Validated records with each key once, the number of records read, and the duplicates dropped."""
    seen: set[JudgementKey] = set()
    todo = []
    total = 0
    for index, record in enumerate(records):
        total += 1
        check_generation_record(record, f"generation record {index}")
        key = judgement_key(record)
        if key in seen:
            continue
        seen.add(key)
        todo.append(record)
    return todo, total, total - len(todo)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


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
    records = load_judgements(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records.values():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
