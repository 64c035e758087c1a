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
from pipeline.config.steps import PruneConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.pareto import PICK_BEST, parse_pick

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
# A second objective (objectives=<metric>,<name>) -> the trial run's metric that holds it and its direction.
COST_OBJECTIVES = {"macs": ("macs", "minimize"), "img_per_s": ("img_per_s_b64", "maximize")}
MAX_PRUNING_RATIO = 0.9  # beyond, layers keep a handful of channels: not a model worth a trial
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


@dataclass(frozen=True)
class TuneConfig:
    """An Optuna study over finetune's lr, batch size, weight decay, frozen depth (and pruning ratio), on the
    validation metric or on it and an inference cost (objectives), with a Pareto front."""

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
    objectives: str = opt(
        "",
        "empty (or the metric alone) = one objective; <metric>,macs or <metric>,img_per_s = two (MACs of one image "
        "minimized, CPU img/s at batch 64 maximized), searched with a Pareto front and no pruner",
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
    pruning_ratio_min: float = opt(0.0, "smallest channel pruning ratio tried (uniform)")
    pruning_ratio_max: float = opt(
        0.0,
        f"largest channel pruning ratio tried (< {MAX_PRUNING_RATIO}); 0 = not searched. A trial prunes the pretrained "
        "net by its ratio (magnitude importance) before fine-tuning",
    )
    timing_seconds: float = same_as(PruneConfig, "timing_seconds")
    timing_threads: int = same_as(PruneConfig, "timing_threads")
    augment: str = same_as(TrainConfig, "augment")
    precision: str = same_as(TrainConfig, "precision")
    device: str = same_as(TrainConfig, "device")
    register_as: str = opt(
        "", "registered model name for the best trial's model (alias `champion`); empty = do not register"
    )
    register_pick: str = opt(
        PICK_BEST,
        "two objectives: which Pareto-front member register_as registers: best (best metric) or fastest_within:D "
        "(best second objective among those within D of the best metric, e.g. 0.01)",
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
        self._check_objectives()
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

    def _check_objectives(self) -> None:
        self.objective_names  # validates
        rule = parse_pick(self.register_pick)
        if rule.kind != PICK_BEST and not self.multi_objective:
            raise PipelineError(
                f"register_pick={self.register_pick} needs two objectives; pass objectives={self.metric},macs "
                "(or img_per_s), or register_pick=best"
            )
        lo, hi = self.pruning_ratio_min, self.pruning_ratio_max
        if not all(isinstance(v, (int, float)) for v in (lo, hi)) or not 0 <= lo <= hi < MAX_PRUNING_RATIO:
            raise PipelineError(
                f"pruning_ratio_min={lo}, pruning_ratio_max={hi}: need 0 <= min <= max < {MAX_PRUNING_RATIO} "
                "(max 0 = pruning not searched)"
            )
        _positive("timing_seconds", self.timing_seconds)
        if not isinstance(self.timing_threads, int) or self.timing_threads < 0:
            raise PipelineError(f"timing_threads={self.timing_threads} must be an integer >= 0 (0 = torch's default)")

    @property
    def objective_names(self) -> list[str]:
        """[metric] or [metric, cost objective] as the user named them (macs, img_per_s)."""
        names = [n.strip() for n in self.objectives.split(",") if n.strip()] or [self.metric]
        if names[0] != self.metric:
            raise PipelineError(
                f"objectives={self.objectives} starts with {names[0]}, but metric={self.metric}: the first objective "
                f"is the metric; pass metric={names[0]} too, or objectives={self.metric},{','.join(names[1:])}"
            )
        if len(names) > 2 or (len(names) == 2 and names[1] not in COST_OBJECTIVES):
            raise PipelineError(
                f"objectives={self.objectives} is not supported; use {self.metric} alone, or {self.metric} and one of: "
                f"{', '.join(COST_OBJECTIVES)} (e.g. objectives={self.metric},macs)"
            )
        return names

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_names) == 2

    @property
    def objective_metrics(self) -> list[str]:
        """The trial-run metric of each objective: the metric, then macs or img_per_s_b64."""
        return [self.metric] + [COST_OBJECTIVES[n][0] for n in self.objective_names[1:]]

    @property
    def directions(self) -> list[str]:
        return [self.direction] + [COST_OBJECTIVES[n][1] for n in self.objective_names[1:]]

    @property
    def searches_pruning(self) -> bool:
        return self.pruning_ratio_max > 0

    @property
    def direction(self) -> str:
        return "minimize" if self.metric == "val_loss" else "maximize"

    def to_params(self) -> dict:
        return asdict(self)

