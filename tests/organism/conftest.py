"""One reduced organism (``configs/organism-small.yaml``), built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pairtrace.organism.build import build_organism
from pairtrace.organism.build_config import OrganismConfig, load_organism_config

SMALL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "organism-small.yaml"


@pytest.fixture(autouse=True)
def _organism_tests_use_one_thread(one_torch_thread):
    """Every organism test runs with one torch thread, as the organism does."""
    yield


@pytest.fixture(scope="session")
def small_config() -> OrganismConfig:
    """The reduced organism config."""
    return load_organism_config(SMALL_CONFIG)


@pytest.fixture(scope="session")
def small_organism(
    tmp_path_factory: pytest.TempPathFactory, small_config: OrganismConfig
) -> tuple[Path, dict[str, Any]]:
    """``(output folder, summary)`` of a full build of the reduced organism."""
    out = tmp_path_factory.mktemp("organism-small")
    summary = build_organism(small_config, out, progress=False)
    return out, summary
