"""The optimizer, learning-rate schedule and weight EMA that fit() trains with, built from a TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.ema import WeightEMA


def create_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedulers (cosine, onecycle); plateau steps per epoch on the monitored metric."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "plateau":
        mode = "min" if cfg.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.2, patience=2)
    return None


def create_ema(net: nn.Module, decay: float) -> WeightEMA | None:
    return WeightEMA(net, decay) if decay > 0 else None
