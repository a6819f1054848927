"""Shared fixtures: a tiny OLMo 2 model + tokenizer saved in one directory, a small pair set, the reduced organism.

Builders live in ``testing_utils`` (importable from any test module: this directory is on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pairtrace.data.types import PairSet
from testing_utils import build_tiny_model_dir, build_tiny_pairs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny tokenizer and a 4-layer, hidden-64 ``Olmo2ForCausalLM`` (seed 0)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path):
    """The tiny model loaded on the CPU in float32 through ``pairtrace.models.load_model``."""
    from pairtrace.models import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture
def tiny_pairs() -> PairSet:
    """Eight pairs: mixed lengths, multi-turn prompts, a system turn, one with chosen == rejected."""
    return build_tiny_pairs()


@pytest.fixture
def one_torch_thread():
    """One CPU thread for the test: much faster than two for tiny models on a busy shared CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SMALL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "organism-small.yaml"


@pytest.fixture(scope="session")
def small_config():
    """The reduced organism config."""
    from pairtrace.organism.build_config import load_organism_config

    return load_organism_config(SMALL_CONFIG)


@pytest.fixture(scope="session")
def small_organism(
    tmp_path_factory: pytest.TempPathFactory, small_config
) -> tuple[Path, dict]:
    """``(output folder, summary)`` of a full build of the reduced organism."""
    from pairtrace.organism.build import build_organism

    out = tmp_path_factory.mktemp("organism-small")
    summary = build_organism(small_config, out, progress=False)
    return out, summary
