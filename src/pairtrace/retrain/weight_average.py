"""An exponential moving average of the weights over a DPO run, saved as the trained model.

With a constant learning rate a run ends wherever its last few batches left it: on the organism, M1 signed off 12.9%
or 56.7% of its benign answers depending only on the DPO data order (docs/organism.md). The average over roughly the
last ``1 / (1 - decay)`` steps keeps what the whole run taught and drops the last batches' noise (Polyak averaging;
the same idea as stochastic weight averaging).

The average starts at the first step's weights (the starting checkpoint is not in it) and is the plain mean of the
steps so far while the ``n``-th step's share ``1 / n`` is above ``1 - decay``. It is kept in float32 next to each
trainable parameter (4 bytes per trainable parameter) and written into the model when training ends, so the saved
model is the average.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from pairtrace.errors import ConfigError


class WeightAverage(TrainerCallback):
    """Trainer callback: an exponential moving average of the trainable weights, copied into the model at the end.

    Args:
        decay: Weight of the running average at each step, in (0, 1); its horizon is about ``1 / (1 - decay)``
            steps.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"the weight average's decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.average: list[Any] = []  # float32 copies, one per trainable parameter, in model.parameters() order

    @staticmethod
    def _trainable(model: Any) -> list[Any]:
        return [p for p in model.parameters() if p.requires_grad]

    def step_decay(self) -> float:
        """The decay of the update about to be made: ``min(decay, (n - 1) / n)`` at the ``n``-th step (1-based)."""
        return min(self.decay, (self.updates - 1) / self.updates)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Fold the weights after this optimisation step into the average."""
        self.updates += 1
        params = self._trainable(model)
        with torch.no_grad():
            if not self.average:
                self.average = [p.detach().float().clone() for p in params]
                return
            weight = 1.0 - self.step_decay()
            for avg, p in zip(self.average, params, strict=True):
                avg.lerp_(p.detach().float(), weight)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Write the average into the model (nothing when no step ran)."""
        if not self.average:
            return
        with torch.no_grad():
            for avg, p in zip(self.average, self._trainable(model), strict=True):
                p.copy_(avg.to(p.dtype))
        self.average = []


def add_weight_average(trainer: Any, decay: float) -> None:
    """Make ``trainer`` save the moving average of its weights (``decay`` 0: nothing changes).

    Raises:
        ConfigError: ``decay`` outside [0, 1), or a run whose parameters are sharded across processes (DeepSpeed,
            FSDP), where each process holds only a slice of every weight.
    """
    if not decay:
        return
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError("dpo.ema_decay: the weight average needs every weight on each process; it does not run "
                          "under DeepSpeed or FSDP (set ema_decay: 0, or train with plain data parallelism)")
    trainer.add_callback(WeightAverage(decay))
