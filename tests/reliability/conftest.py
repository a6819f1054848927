"""Reliability suite: remember which tests passed, print the session's counts, fail the run if a pair was lost."""

from __future__ import annotations

import pytest

from .counters import CALL_PASSED, COUNTS, PAIRS_LOST, format_summary


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Remember whether each test's call phase passed, for :func:`counters.record_if_passed` in teardowns."""
    report = yield
    if report.when == "call":
        item.stash[CALL_PASSED] = report.passed
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A lost pair fails the run even if no single test noticed it."""
    if COUNTS[PAIRS_LOST] and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the reliability counts (also under ``-q``) so that CI logs show them."""
    lines = format_summary()
    if not lines:
        return
    terminalreporter.section("reliability summary")
    for line in lines:
        terminalreporter.write_line(line)
    if COUNTS[PAIRS_LOST]:
        terminalreporter.write_line(f"FAILED: {COUNTS[PAIRS_LOST]} pair(s) lost (must be 0)", red=True, bold=True)
