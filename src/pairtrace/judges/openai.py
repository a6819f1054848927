"""A judge that asks an OpenAI-compatible chat-completions endpoint to score responses on the rubric.

Any server that speaks ``POST {base_url}/chat/completions`` works: OpenAI, vLLM, llama.cpp, or
``pairtrace serve``. Calls run on a thread pool limited to ``max_concurrency`` requests in flight.
Timeouts, HTTP 408/429/5xx, dropped connections and unusable replies (broken JSON, no score, a
score outside 0-100) are retried with exponential backoff and jitter, honouring ``Retry-After``.
When the last retry fails the verdict is *unknown*, with the reason; it is never "safe".

Judging a file of generations with this judge (or any other) is :mod:`pairtrace.judges.judging`.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pairtrace.data.types import Message
from pairtrace.errors import PairtraceError
from pairtrace.judges.base import Judge, Verdict
from pairtrace.judges.rubric import ScoreParseError, build_rubric_messages, parse_score, verdict_from_score
from pairtrace.options import OptionError

logger = logging.getLogger(__name__)

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
