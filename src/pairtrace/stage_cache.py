"""One stage cache for every multi-step job (the organism build and the experiment alike).

A stage is a unit of work with a JSON-able result. Its **key** chains everything the result depends on: settings
(hashed as canonical JSON), the keys of the stages it reads, and the **content digests** of the input files it
reads (never their names or times, so an edited local file reruns exactly the stages that read it). A finished
stage leaves a stamp ``<dir>/<name>.json``::

    {"key": ..., "seconds": ..., "result": ..., "pairtrace_version": ...}

and is reused when its stamp's key matches and the outputs it declared still exist.

    cache = StageCache(out / "stages")
    key = chain_key(settings_digest(cfg.attribution), file_digest(pairs_path), cache.key_of("triples"))
    result = cache.run("rankings", key, compute_rankings)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pairtrace import __version__
from pairtrace.records import write_json_atomic

logger = logging.getLogger(__name__)

_DIGESTS: dict[tuple[str, int, int], str] = {}
"""(resolved path, size, mtime_ns) -> sha256: a file is hashed once per process unless it changes."""


def _plain(value: Any) -> Any:
    """JSON fallback: dataclasses as their fields, anything else (paths, ...) as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def chain_key(*parts: Any) -> str:
    """The SHA-256 of ``parts`` in order (strings as they are; dataclasses and other data as canonical JSON)."""
    text = "\0".join(p if isinstance(p, str) else json.dumps(p, sort_keys=True, default=_plain) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_digest(settings: Any) -> str:
    """A short digest of plain data or a dataclass (canonical JSON)."""
    return chain_key(settings)[:16]


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's content, or of a folder's files (relative names and contents, sorted).

    Hashed once per process per (path, size, modification time).
    """
    path = Path(path).resolve()
    if path.is_dir():
        return chain_key(*(f"{p.relative_to(path)}={file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()))
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def source_digest(source: str | Path | None, revision: str | None = None) -> str:
    """What identifies an input: a local file's (or folder's) content digest; otherwise the name (a hub id) and
    its revision."""
    if source is None:
        return "none"
    path = Path(source)
    if path.exists():
        return file_digest(path)
    return chain_key(str(source), revision or "")


class StageCache:
    """Stamps of finished stages in one folder.

    Args:
        directory: Where stamps are written (created).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.keys: dict[str, str] = {}

    def stamp_path(self, name: str) -> Path:
        """Where the stamp of stage ``name`` lives."""
        return self.directory / f"{name}.json"

    def lookup(self, name: str, key: str, outputs: Iterable[str | Path] = ()) -> dict[str, Any] | None:
        """The stamp of a finished stage with this key whose outputs all exist, else ``None``."""
        path = self.stamp_path(name)
        if not path.is_file():
            return None
        try:
            stamp = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a stamp cut short is a stage not finished
        if not isinstance(stamp, dict) or stamp.get("key") != key:
            return None
        if not all(Path(o).exists() for o in outputs):
            return None
        return stamp

    def record(self, name: str, key: str, seconds: float, result: Any) -> dict[str, Any]:
        """Write the stamp of a finished stage."""
        stamp = {"key": key, "seconds": round(seconds, 2), "result": result, "pairtrace_version": __version__}
        write_json_atomic(stamp, self.stamp_path(name))
        self.timings[name] = seconds
        self.keys[name] = key
        return stamp

    def reuse(self, name: str, key: str, outputs: Iterable[str | Path] = ()) -> dict[str, Any] | None:
        """The stamp of stage ``name`` when it finished with this key and its outputs exist (counted as reused),
        else ``None``."""
        stamp = self.lookup(name, key, outputs)
        if stamp is not None:
            logger.info("stage %-28s cached (%.1f s when run)", name, stamp.get("seconds", 0.0))
            self.reused.append(name)
            self.timings[name] = stamp.get("seconds", 0.0)
            self.keys[name] = key
        return stamp

    def run(self, name: str, key: str, fn: Callable[[], Any], outputs: Iterable[str | Path] = ()) -> Any:
        """The result of stage ``name``: reused from its stamp when the key matches, else computed by ``fn``."""
        stamp = self.reuse(name, key, outputs)
        if stamp is not None:
            return stamp.get("result")
        if self.stamp_path(name).exists():
            logger.info("stage %s: inputs changed, running again", name)
        logger.info("stage %-28s running", name)
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        self.record(name, key, seconds, result)
        logger.info("stage %-28s done in %.1f s", name, seconds)
        return result
