"""LoopState: what fit() carries from one epoch to the next, on its own so that the loop
(pipeline.train.loop) and the checkpoint that saves it (pipeline.train.checkpoint) both import it
and neither imports the other's module for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.train.ema import WeightEMA


@dataclass
class LoopState:
    """What fit() carries from one epoch to the next: exactly what a checkpoint saves and restores
    (pipeline.train.checkpoint.checkpoint_state / restore_state,
    which import this module and nothing of the loop's)."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
    ema: WeightEMA | None
    epoch: int = 0  # the last finished epoch
    best_value: float | None = None
    best_epoch: int = 0
    best_model: dict | None = None  # the scored weights of best_epoch, on the CPU
    history: list[dict[str, float]] = field(default_factory=list)
    stale_epochs: int = 0  # epochs since the monitored metric last improved
    # No generator state: every epoch's draws are seeded from (seed, epoch[, rank]) (_seed_epoch).

    @property
    def scored(self) -> nn.Module:
        """The weights that are validated and kept: the EMA average where there is one."""
        return self.ema.module if self.ema is not None else self.net
