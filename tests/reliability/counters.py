"""Counts gathered by the reliability tests, printed once at the end of the test session (see ``conftest.py``).

Every reliability test adds what it tried and survived here, so the CI log shows one summary::

    inputs tried, errors caught cleanly, pairs lost (must be 0),
    kill/resume cycles survived with identical output, judge faults survived

A test records its counts only after its assertions passed (or, from a fixture, with :func:`record_if_passed`),
so the summary never counts an input that was not handled correctly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pytest

INPUTS_TRIED = "inputs tried"
ERRORS_CAUGHT = "errors caught cleanly"
PAIRS_LOST = "pairs lost"
KILL_CYCLES = "kill/resume cycles survived with identical output"
JUDGE_FAULTS = "judge faults survived"

SUMMARY_ORDER = (INPUTS_TRIED, ERRORS_CAUGHT, PAIRS_LOST, KILL_CYCLES, JUDGE_FAULTS)
"""The headline counts, always printed (zero included) once any reliability test has recorded something."""

COUNTS: Counter[str] = Counter()
"""Session-wide counts, keyed by the names above (plus any detail counts a test adds)."""

CALL_PASSED = pytest.StashKey[bool]()
"""Set on each test item by ``conftest.py``: whether the test's call phase passed."""


def record(name: str, n: int = 1) -> None:
    """Add ``n`` to the count ``name``."""
    COUNTS[name] += int(n)


def record_caught(n: int = 1) -> None:
    """Count ``n`` bad inputs that were tried and refused with a clear error (no crash, no silent result)."""
    record(INPUTS_TRIED, n)
    record(ERRORS_CAUGHT, n)


def record_reader_fuzz(stats: Mapping[str, int]) -> None:
    """Fold the reader fuzz tests' own counters into the session counts.

    Each fuzzed record read is one input, and so is each fuzzed file read again in strict mode; each bad record
    reported (and skipped) is one error caught, and so is each strict read that stopped with a ``DataError``.

    Args:
        stats: ``records tried``, ``inputs tried`` (files), ``bad records caught``, ``strict errors caught`` and
            ``pairs lost`` as counted by ``test_fuzz_readers.py``.
    """
    record(INPUTS_TRIED, stats.get("records tried", 0) + stats.get("inputs tried", 0))
    record(ERRORS_CAUGHT, stats.get("bad records caught", 0) + stats.get("strict errors caught", 0))
    record(PAIRS_LOST, stats.get("pairs lost", 0))
    record("fuzzed files tried", stats.get("inputs tried", 0))


def record_if_passed(node: pytest.Item, name: str, n: int) -> None:
    """From a fixture's teardown: add ``n`` to ``name`` only if the test that used the fixture passed."""
    if node.stash.get(CALL_PASSED, False):
        record(name, n)


def format_summary() -> list[str]:
    """The summary lines: the headline counts first, then any detail counts, or nothing if none were recorded."""
    if not COUNTS:
        return []
    lines = [f"{name}: {COUNTS[name]}" for name in SUMMARY_ORDER]
    lines += [f"  {name}: {value}" for name, value in sorted(COUNTS.items()) if name not in SUMMARY_ORDER]
    return lines
