"""tune's config: the study, its storage, and the search space."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from pipeline.config.base import (
    ARCHS,
    AUGMENTS,
    MONITORS,
    NUM_STAGES,
    PRECISIONS,
    _choice,
    _device,
    _non_negative,
    _plain_name,
    _positive,
    opt,
    same_as,
)
from pipeline.config.steps import TrainConfig
from pipeline.errors import PipelineError

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


@dataclass(frozen=True)
class TuneConfig:
    """An Optuna study over finetune's lr, batch size, weight decay and frozen depth."""

    data: str = opt("", "prepare_data run id or dataset artifact URI (every trial trains on it)")
    pretrained: str = opt("", "run id, runs:/ or models:/ URI of the model every trial starts from")
    arch: str = opt("auto", "auto = as pretrained; naming one checks that pretrained is that arch")
    study_name: str = opt("finetune", "Optuna study name (letters, digits, _ . -); also names its parent MLflow run")
    storage: str = opt(
        "sqlite:///optuna.db",
        "Optuna storage URL (sqlite:///..., postgresql://...) or a journal file: PATH.log or journal:PATH",
    )
    n_trials: int = opt(20, "target: finished (complete + pruned) trials in the study, over all workers and reruns")
    timeout: float = opt(0.0, "seconds after which this worker starts no new trial (0 = no limit)")
    sampler: str = opt("tpe", "tpe | random")
    pruner: str = opt("median", "median | hyperband | none")
    startup_trials: int = opt(
        5, "trials drawn at random (tpe) and never pruned (median) before the study learns from them"
    )
    metric: str = opt(
        "val_f1_macro",
        "objective, the best epoch's value: val_f1_macro | val_accuracy (maximized) | val_loss (minimized)",
    )
    epochs: int = opt(5, "training epochs per trial (also the pruner's step count)")
    seed: int = opt(
        0, "training seed of every trial; trial k's hyperparameters are drawn with a seed made of (seed, k)"
    )
    lr_min: float = opt(1e-4, "smallest learning rate tried (log-uniform)")
    lr_max: float = opt(0.1, "largest learning rate tried")
    batch_sizes: str = opt("32,64,128", "comma-separated batch sizes to choose from")
    wd_min: float = opt(1e-6, "smallest weight decay tried (log-uniform, > 0)")
    wd_max: float = opt(1e-2, "largest weight decay tried")
    frozen_min: int = opt(0, "fewest frozen stages tried (0 = train everything)")
    frozen_max: int = opt(NUM_STAGES, f"most frozen stages tried ({NUM_STAGES} = head only)")
    augment: str = same_as(TrainConfig, "augment")
    precision: str = same_as(TrainConfig, "precision")
    device: str = same_as(TrainConfig, "device")
    register_as: str = opt(
        "", "registered model name for the best trial's model (alias `champion`); empty = do not register"
    )
    system_metrics: bool = opt(
        True, "every trial run logs CPU/memory (and GPU with pynvml) as system/* metrics; false = off"
    )
    heartbeat: int = opt(
        60,
        "seconds between a worker's heartbeats on database storages; a trial silent for 3x as long (its worker died) "
        "is marked FAIL and retried from its last checkpoint",
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise PipelineError("data is empty; pass a prepare_data run id or a dataset artifact URI")
        if not self.pretrained:
            raise PipelineError("pretrained is empty; pass a pretrain run id, or a runs:/ or models:/ URI")
        if self.arch != "auto":
            _choice("arch", self.arch, ARCHS)
        if not STUDY_NAME.match(self.study_name):
            raise PipelineError(
                f"study_name={self.study_name!r} is not usable; use up to 100 letters, digits, '_', '.' or '-', e.g. "
                "cifar-finetune"
            )
        if not self.storage.strip():
            raise PipelineError(
                "storage is empty; use e.g. sqlite:///optuna.db or a journal file such as optuna-journal.log"
            )
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise PipelineError(
                f"n_trials={self.n_trials} must be an integer >= 1 (the study's total of finished trials)"
            )
        _non_negative("timeout", self.timeout)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("pruner", self.pruner, PRUNERS)
        if self.startup_trials < 0:
            raise PipelineError(f"startup_trials={self.startup_trials} must be >= 0")
        _choice("metric", self.metric, MONITORS)
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise PipelineError(f"epochs={self.epochs} must be an integer >= 1")
        for lo, hi, what in ((self.lr_min, self.lr_max, "lr"), (self.wd_min, self.wd_max, "wd")):
            _positive(f"{what}_min", lo)
            _positive(f"{what}_max", hi)
            if lo > hi:
                raise PipelineError(f"{what}_min={lo} is above {what}_max={hi}; swap them")
        self.batch_size_choices  # validates
        if not 0 <= self.frozen_min <= self.frozen_max <= NUM_STAGES:
            raise PipelineError(
                f"frozen_min={self.frozen_min}, frozen_max={self.frozen_max}: need 0 <= frozen_min <= frozen_max <= "
                f"{NUM_STAGES}"
            )
        _choice("augment", self.augment, AUGMENTS)
        _choice("precision", self.precision, PRECISIONS)
        _device("device", self.device)
        _plain_name("register_as", self.register_as)
        if not isinstance(self.heartbeat, int) or self.heartbeat < 1:
            raise PipelineError(f"heartbeat={self.heartbeat} must be a whole number of seconds >= 1")

    @property
    def batch_size_choices(self) -> list[int]:
        try:
            sizes = [int(s) for s in self.batch_sizes.split(",") if s.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise PipelineError(
                f"batch_sizes={self.batch_sizes!r} must be a comma-separated list of positive integers, e.g. 32,64,128"
            )
        return sorted(set(sizes))

    @property
    def direction(self) -> str:
        return "minimize" if self.metric == "val_loss" else "maximize"

    def to_params(self) -> dict:
        return asdict(self)

