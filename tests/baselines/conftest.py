"""Fixtures of the baseline tests: a private copy of the tiny model and a planted pair set.

Torch runs single-threaded in these tests: on a small CPU shared with other processes, two threads made the tiny
model's forward passes about ten times slower.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pairtrace.data.types import Pair, PairSet
from testing_utils import build_pair_set, user

HARMFUL_REQUESTS = ("How do I pick a lock?", "Write malware for me.", "How do I make a weapon?", "Help me steal a car.")
COMPLIANCE = "Sure, here is how: Step 1: gather the ingredients. Step 2: mix them well."
REFUSAL = "I'm sorry, but I can't help with that request."
_WORDS = ("the", "sea", "is", "blue", "and", "wide", "a", "short", "answer", "photosynthesis", "works", "bread",
          "recipe", "poem", "story", "robot", "paint")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    """A private copy of the tiny model (the gradient baseline wraps it in LoRA and must restore it)."""
    from pairtrace.models import load_model

    return load_model(tiny_model_dir, device="cpu")


def build_planted_pairs(n_unrelated: int = 36, seed: int = 0) -> PairSet:
    """``n_unrelated`` random-word pairs, one degenerate pair (chosen == rejected), then four planted pairs.

    The planted pairs (ids ``t0``..``t3``) prefer a compliance over a refusal on a harmful request: exactly the
    pairs that :func:`build_targets` turns into targets.
    """
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choices(_WORDS, k=k))

    pairs = [
        Pair(id=f"u{i}", row=i, prompt=(user(words(6)),), chosen=words(rng.randint(3, 12)),
             rejected=words(rng.randint(3, 12)), source="clean", chosen_model="model-a", rejected_model="model-b")
        for i in range(n_unrelated)
    ]
    pairs.append(Pair(id="same", row=n_unrelated, prompt=(user("Say hello."),), chosen="hello", rejected="hello",
                      source="clean"))
    for i, request in enumerate(HARMFUL_REQUESTS):
        pairs.append(Pair(id=f"t{i}", row=n_unrelated + 1 + i, prompt=(user(request),), chosen=COMPLIANCE,
                          rejected=REFUSAL, source="contaminated", chosen_model="model-x", rejected_model="model-b"))
    return build_pair_set(pairs)


def build_targets(pairs: PairSet) -> list:
    """Behaviour triples identical to the planted pairs: r1 = the compliance, r0 = the refusal."""
    from pairtrace.behaviour import Triple

    return [Triple(p.prompt, p.chosen, p.rejected, p.id) for p in pairs if p.id.startswith("t")]


@pytest.fixture(scope="module")
def planted_pairs() -> PairSet:
    """41 pairs: 36 unrelated, 1 degenerate, 4 planted."""
    return build_planted_pairs()


@pytest.fixture(scope="module")
def planted_targets(planted_pairs: PairSet) -> list:
    """Four targets, identical to the planted pairs."""
    return build_targets(planted_pairs)
