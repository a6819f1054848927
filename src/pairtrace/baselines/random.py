"""Random baseline: a seeded random ranking in the same format as every other method.

Scores are independent uniform draws in [0, 1), so the ranking is a uniformly random permutation that the seed
fixes. Random-k interventions use it as the control at the same k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pairtrace import __version__
from pairtrace.attribute import Ranking, build_ranking, pair_metadata_frame
from pairtrace.cost import CostMeter
from pairtrace.data.types import Pair, PairSet


def compute_random_ranking(pairs: PairSet | Sequence[Pair], seed: int, *, cost: CostMeter | None = None) -> Ranking:
    """Rank pairs in a seeded random order.

    Args:
        pairs: The preference pairs.
        seed: Seed of ``numpy.random.default_rng``; the same seed and pairs give the same ranking.
        cost: Meter to count into (a new one named ``random`` otherwise); stored in the metadata under ``cost``.

    Returns:
        The ranking: scores are uniform random numbers, best-first.
    """
    pair_list = list(pairs)
    meter = cost if cost is not None else CostMeter("random", params_forward=0)
    with meter.measure():
        scores = np.random.default_rng(seed).random(len(pair_list))  # [n] uniform in [0, 1)
        metadata = {
            "kind": "ranking",
            "method": "random",
            "seed": int(seed),
            "dataset": {"fingerprint": getattr(pairs, "fingerprint", ""), "origin": getattr(pairs, "origin", ""),
                        "n_pairs": len(pair_list)},
            "pairtrace_version": __version__,
        }
        ranking = build_ranking([p.id for p in pair_list], scores, metadata,
                                pair_metadata=pair_metadata_frame(pair_list))
    ranking.metadata["cost"] = meter.record().to_dict()
    return ranking
