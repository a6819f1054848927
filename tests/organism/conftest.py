"""Organism tests run with one torch thread, as the organism does (the reduced organism itself is built once per
session by the fixtures in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _organism_tests_use_one_thread(one_torch_thread):
    """Every organism test runs with one torch thread, as the organism does."""
    yield
