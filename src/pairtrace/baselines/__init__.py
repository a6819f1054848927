"""Attribution baselines that the probe and bank are compared with, each producing a standard ``Ranking``.

- :func:`compute_gradient_ranking`: LESS (LoRA gradients, Adam-preconditioned, randomly projected) adapted to DPO;
- :func:`compute_llm_judge_ranking`: judged harmfulness of chosen minus rejected;
- :func:`compute_random_ranking`: a seeded random order.
"""

from pairtrace.baselines.gradient import GradientConfig, compute_gradient_ranking
from pairtrace.baselines.llm_judge import compute_llm_judge_ranking
from pairtrace.baselines.random import compute_random_ranking

__all__ = ["GradientConfig", "compute_gradient_ranking", "compute_llm_judge_ranking", "compute_random_ranking"]
