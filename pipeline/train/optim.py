"""The optimizer, learning-rate schedule and weight EMA that fit() trains with, built from a TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.model.models import fixed_parameters, norm_parameters
from pipeline.train.ema import WeightEMA

# triangle: the lr starts at this share of the peak, peaks at the end of the warm-up, and ends at the
# other share on the last step (airbench94's schedule: 0.2 -> 1 at 23% of the steps -> 0.07).
TRIANGLE_START, TRIANGLE_END = 0.2, 0.07


def parameter_groups(net: nn.Module, cfg: TrainConfig) -> list[dict]:
    """What create_optimizer trains: the net's trainable parameters, never its fixed ones
    (fixed_parameters), in one group; with SGD, the parameters the net trains at a scaled lr
    (norm_parameters: airnet's BatchNorm biases) in a second group at lr x scale and weight decay / scale,
    so that their per-step decay lr x weight_decay is the other parameters'. Adam needs no such scale:
    it normalizes each parameter's step already."""
    cfg = cfg.resolved()
    fixed = {id(p) for p in fixed_parameters(net)}
    trainable = [p for p in net.parameters() if p.requires_grad and id(p) not in fixed]
    scaled, scale = norm_parameters(net)
    scaled_ids = {id(p) for p in scaled} if cfg.optimizer == "sgd" and scale != 1 else set()
    groups = [{"params": [p for p in trainable if id(p) not in scaled_ids]}]
    norm = [p for p in trainable if id(p) in scaled_ids]
    if norm:
        groups.append({"params": norm, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay / scale})
    return groups


def create_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov, momentum 0.9) or AdamW over `params`: parameters, or parameter_groups(net, cfg)."""
    cfg = cfg.resolved()  # recipe options left at auto: the arch's
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedulers (cosine, onecycle, triangle); plateau steps per epoch on the monitored metric.
    Each scales every parameter group's own lr (airnet's BatchNorm biases keep their multiple)."""
    cfg = cfg.resolved()
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "triangle":
        return torch.optim.lr_scheduler.LambdaLR(opt, triangle(total, int(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    if cfg.schedule == "plateau":
        mode = "min" if cfg.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.2, patience=2)
    return None


def triangle(total: int, peak: int):
    """The lr factor of step s (0 .. total - 1): linear from TRIANGLE_START at step 0 to 1 at step `peak`,
    then linear down to TRIANGLE_END at the last step."""
    last = max(1, total - 1)
    peak = min(peak, last)

    def factor(step: int) -> float:
        if step < peak:
            return TRIANGLE_START + (1 - TRIANGLE_START) * step / peak
        return max(TRIANGLE_END, 1 - (1 - TRIANGLE_END) * (step - peak) / max(1, last - peak))

    return factor


def create_ema(net: nn.Module, decay: float) -> WeightEMA | None:
    return WeightEMA(net, decay) if decay > 0 else None
