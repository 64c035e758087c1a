"""One frozen dataclass per step, validated on construction with messages that say the fix.

Validation happens here, before any expensive work (decoding images, opening a study).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from pipeline.errors import PipelineError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet9", "mobilenet_v3_small", "mobilenet_v3_large", "vgg11_bn")
WEIGHTS = ("none", "imagenet")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "cuda:<K>")  # cuda:K = the K-th visible GPU (one per tune worker)
CUDA_INDEXED = re.compile(r"^cuda:[0-9]+$")
SCHEDULES = ("cosine", "onecycle", "plateau", "constant")
AUGMENTS = ("none", "basic", "strong")
MONITORS = ("val_f1_macro", "val_accuracy", "val_loss")
SPLITS = ("train", "val", "test")
ON_BAD_IMAGE = ("skip", "fail")
IMPORTANCES = ("magnitude", "bn_scale", "taylor")  # how prune scores channels (pipeline.pruning)
# PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS outright (it only warns above 1x), so this
# default keeps every image that PIL decodes by default decodable here.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
MAX_IMAGE_PIXELS_HELP = ("image folders: files with more pixels (width x height) are skipped undecoded, "
                         "as on_bad_image says; 0 = no limit")
NUM_STAGES = 5  # stem, layer1, layer2, layer3, layer4: what frozen_layers counts
# Images per inference forward pass (validation, evaluate, registry scoring). Defined here, not in
# pipeline.device, so that the configs stay importable without torch; pipeline.device re-exports it.
EVAL_BATCH = 512


def opt(default, help: str):
    """A config field whose help text is shown by the step's --help (one source of truth)."""
    return field(default=default, metadata={"help": help})


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PipelineError(f"{name}={value!r} is not supported; use one of: {', '.join(allowed)}")


def _device(name: str, value: str) -> None:
    if not (isinstance(value, str) and CUDA_INDEXED.match(value)):
        _choice(name, value, DEVICES[:-1] + ("cuda:0", "cuda:1", "..."))


def _fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise PipelineError(f"{name}={value} is out of range; use a fraction in [0, 1), e.g. 0.1")


def _positive(name: str, value: float, kind: str = "number") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise PipelineError(f"{name}={value} must be a positive {kind}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise PipelineError(f"{name}={value} must be >= 0")


def _pixel_limit(value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PipelineError(f"max_image_pixels={value} must be an integer >= 0 (0 = no limit), e.g. 178956970")


def _plain_name(name: str, value: str) -> None:
    if "'" in value or '"' in value:
        raise PipelineError(f"{name}={value!r} contains a quote; use a plain name, e.g. cifar10-resnet18")


@dataclass(frozen=True)
class PrepareConfig:
    source: str = opt("cifar10", "cifar10 | digits | path to an image folder or .tar/.tar.gz/.zip of one")
    data_dir: str = opt("data", "where downloads (CIFAR-10) are cached")
    image_size: int = opt(32, "pixels; every image is resized to image_size x image_size")
    val_fraction: float = opt(0.1, "share of the training images held out for validation")
    test_fraction: float = opt(0.1, "share held out for test, only when the source has no test split")
    classes: str = opt("", "comma-separated subset of class names; empty = all")
    samples_per_class: int = opt(0, "cap on training images per class (0 = all); val/test are not capped")
    on_bad_image: str = opt("skip", "skip (and count) or fail on files that are not decodable images")
    max_image_pixels: int = opt(DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_HELP)
    seed: int = opt(0, "random seed for the stratified split and the per-class cap")

    def __post_init__(self) -> None:
        if not self.source:
            raise PipelineError("source is empty; use cifar10, digits, or a path to an image folder/archive")
        _positive("image_size", self.image_size, "integer (pixels)")
        if self.image_size < 8:
            raise PipelineError(f"image_size={self.image_size} is too small; use 8 or more pixels")
        _fraction("val_fraction", self.val_fraction)
        _fraction("test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise PipelineError("val_fraction + test_fraction must be below 1 so that training images remain")
        if self.samples_per_class < 0:
            raise PipelineError(f"samples_per_class={self.samples_per_class} must be >= 0 (0 = all)")
        _choice("on_bad_image", self.on_bad_image, ON_BAD_IMAGE)
        _pixel_limit(self.max_image_pixels)

    @property
    def class_subset(self) -> list[str]:
        return [c.strip() for c in self.classes.split(",") if c.strip()]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by pretrain and finetune (finetune adds the two last fields)."""

    data: str = opt("", "prepare_data run id or dataset artifact URI")
    arch: str = opt(
        "resnet18",
        "resnet18 | resnet34 | resnet50 | resnet9 | mobilenet_v3_small | mobilenet_v3_large | vgg11_bn; "
        "finetune: auto = as pretrained",
    )
    weights: str = opt("none", "none | imagenet (torchvision's ImageNet weights, from the torch hub cache)")
    epochs: int = opt(10, "passes over the training split")
    batch_size: int = opt(128, "images per optimizer step")
    lr: float = opt(0.05, "peak learning rate")
    weight_decay: float = opt(5e-4, "L2 penalty (SGD) / decoupled decay (AdamW)")
    optimizer: str = opt("sgd", "sgd (Nesterov momentum 0.9) | adamw")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing, in [0, 1)")
    schedule: str = opt("cosine", "cosine | onecycle | plateau (on the monitored metric) | constant")
    warmup_epochs: float = opt(0.0, "linear warm-up length for cosine, in epochs")
    patience: int = opt(0, "early stopping: epochs without improvement of `monitor` (0 = off)")
    monitor: str = opt("val_f1_macro", "validation metric that picks the best epoch")
    dropout: float = opt(0.0, "dropout before the classification head")
    augment: str = opt("basic", "none | basic (random crop, padding 1/8 of the side, + flip) | strong (+ rotation and "
                                "scale)")
    ema: float = opt(0.0, "weight EMA decay per step (0 = off), e.g. 0.999")
    tta: bool = opt(False, "flip test-time augmentation at validation/evaluation")
    precision: str = opt("auto", "auto (bf16 where the hardware has it) | bf16 | fp32")
    device: str = opt("auto", "auto | cpu | cuda | cuda:K (the K-th visible GPU, e.g. one per tune worker)")
    compile: bool = opt(
        False, "torch.compile the model (pays off on GPUs for long runs); drops each epoch's short last batch"
    )
    checkpoint_every: float = opt(
        30.0,
        "seconds between writes of the resumable checkpoint (always after the last epoch and on interruption); 0 = "
        "every epoch",
    )
    system_metrics: bool = opt(
        True,
        "log CPU, memory, disk and network use (GPU too where pynvml is installed) as system/* metrics of the run; "
        "false = off",
    )
    seed: int = opt(0, "seeds weights init, shuffling and augmentation")
    calibrate: bool = opt(True, "fit a temperature on the validation split after training, so the served model's "
                                "confidence matches its accuracy (argmax unchanged); false = plain softmax")
    pretrained: str = opt("", "finetune only: run id, runs:/ or models:/ URI")
    frozen_layers: int = opt(
        0, f"finetune only: freeze the first k of stem, layer1..layer4 (0-{NUM_STAGES}; {NUM_STAGES} = head only)"
    )
    resume: str = opt(
        "",
        "run id of an interrupted run of this step: continue it in place from its last checkpoint, with its stored "
        "config",
    )
    register_as: str = opt(
        "",
        "registered model name: after training, score on the test split and register the model (alias `champion` moves "
        "on better test macro-F1); empty = do not register",
    )
    keep_checkpoint: bool = opt(
        False,
        "keep the resumable checkpoint (checkpoints/last.pt, ~3x the model's size) "
        "of a run that finished; false = delete it (interrupted and failed runs always keep it)",
    )

    def __post_init__(self) -> None:
        if self.arch == "auto":
            if not self.pretrained and not self.resume:  # a resumed run's stored config has both
                raise PipelineError(
                    "finetune needs pretrained: a pretrain run id, or a runs:/ or models:/ URI "
                    "(arch=auto takes its architecture)"
                )
        else:
            _choice("arch", self.arch, ARCHS)
        _choice("weights", self.weights, WEIGHTS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("precision", self.precision, PRECISIONS)
        _device("device", self.device)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("augment", self.augment, AUGMENTS)
        _choice("monitor", self.monitor, MONITORS)
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise PipelineError(f"epochs={self.epochs} must be an integer >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PipelineError(f"batch_size={self.batch_size} must be an integer >= 1")
        _positive("lr", self.lr)
        _non_negative("weight_decay", self.weight_decay)
        _fraction("label_smoothing", self.label_smoothing)
        _fraction("dropout", self.dropout)
        _fraction("ema", self.ema)
        _non_negative("warmup_epochs", self.warmup_epochs)
        _non_negative("checkpoint_every", self.checkpoint_every)
        if self.patience < 0:
            raise PipelineError(f"patience={self.patience} must be >= 0 (0 = no early stopping)")
        if not 0 <= self.frozen_layers <= NUM_STAGES:
            raise PipelineError(
                f"frozen_layers={self.frozen_layers} is out of range; use 0 (train all) to {NUM_STAGES} (head only)"
            )
        if self.arch == "resnet9" and self.weights == "imagenet":
            raise PipelineError("arch=resnet9 has no ImageNet weights; use weights=none or a resnet arch")
        _plain_name("register_as", self.register_as)

    def to_params(self) -> dict:
        return asdict(self)


def _as_in_train(name: str, default=MISSING):
    """A field of another step's config that means what TrainConfig's field `name` means: same help."""
    train_field = next(f for f in fields(TrainConfig) if f.name == name)
    return field(default=train_field.default if default is MISSING else default, metadata=train_field.metadata)


# The training options prune's recovery fine-tuning takes, as TrainConfig spells them.
RECOVERY_OPTIONS = ("batch_size", "lr", "weight_decay", "optimizer", "label_smoothing", "schedule", "warmup_epochs",
                    "patience", "monitor", "augment", "ema", "precision", "device", "seed", "system_metrics")


@dataclass(frozen=True)
class PruneConfig:
    """prune: remove whole channels from a trained model, fine-tune to recover, log the smaller model."""

    model: str = opt("", "run id, runs:/ or models:/ URI of the trained model to prune")
    data: str = opt("", "prepare_data run id or dataset URI: the model's dataset (train/val to recover, test to score)")
    pruning_ratio: float = opt(0.5, "share of the channels removed from every prunable layer, in (0, 1); "
                                    "MACs fall to about (1 - ratio)^2")
    importance: str = opt("magnitude", "magnitude (L2 norm of weights) | bn_scale (|BatchNorm gamma|) | "
                                       "taylor (|weight x gradient| on a few training batches)")
    iterative_steps: int = opt(1, "prune in this many equal steps, re-scoring channels between steps")
    recovery_epochs: int = opt(5, "fine-tuning epochs after pruning (0 = none)")
    timing_seconds: float = opt(1.0, "seconds each CPU inference img/s measurement runs (batch 1 and 64, "
                                     "before and after)")
    timing_threads: int = opt(1, "torch threads of the img/s measurement (0 = torch's default, all cores); 1 "
                                 "because on a busy machine more threads than free cores run many times slower")
    batch_size: int = _as_in_train("batch_size")
    lr: float = _as_in_train("lr", 0.01)
    weight_decay: float = _as_in_train("weight_decay")
    optimizer: str = _as_in_train("optimizer")
    label_smoothing: float = _as_in_train("label_smoothing")
    schedule: str = _as_in_train("schedule")
    warmup_epochs: float = _as_in_train("warmup_epochs")
    patience: int = _as_in_train("patience")
    monitor: str = _as_in_train("monitor")
    augment: str = _as_in_train("augment")
    ema: float = _as_in_train("ema")
    precision: str = _as_in_train("precision")
    device: str = _as_in_train("device")
    seed: int = _as_in_train("seed")
    system_metrics: bool = _as_in_train("system_metrics")
    register_as: str = opt("", "registered model name: register the pruned model with its test metrics (alias "
                               "`champion` moves on better test macro-F1); empty = do not register")

    def __post_init__(self) -> None:
        if not self.model:
            raise PipelineError("model is empty; pass a pretrain/finetune/prune run id or a runs:/ or models:/ URI")
        if not self.data:
            raise PipelineError("data is empty; pass the model's prepare_data run id or dataset URI")
        if not (isinstance(self.pruning_ratio, (int, float)) and 0.0 < self.pruning_ratio < 1.0):
            raise PipelineError(
                f"pruning_ratio={self.pruning_ratio} is out of range; use a fraction in (0, 1), e.g. 0.5"
            )
        _choice("importance", self.importance, IMPORTANCES)
        if not isinstance(self.iterative_steps, int) or self.iterative_steps < 1:
            raise PipelineError(f"iterative_steps={self.iterative_steps} must be an integer >= 1")
        if not isinstance(self.recovery_epochs, int) or self.recovery_epochs < 0:
            raise PipelineError(f"recovery_epochs={self.recovery_epochs} must be an integer >= 0 (0 = no fine-tuning)")
        _positive("timing_seconds", self.timing_seconds)
        if not isinstance(self.timing_threads, int) or self.timing_threads < 0:
            raise PipelineError(f"timing_threads={self.timing_threads} must be an integer >= 0 (0 = torch's default)")
        _plain_name("register_as", self.register_as)
        self.recovery_config(ARCHS[0])  # validates the training options as TrainConfig does

    def recovery_config(self, arch: str) -> TrainConfig:
        """The TrainConfig of the recovery fine-tuning of a pruned `arch` (epochs >= 1 for TrainConfig's sake)."""
        options = {name: getattr(self, name) for name in RECOVERY_OPTIONS}
        return TrainConfig(data=self.data, arch=arch, epochs=max(1, self.recovery_epochs), **options)

    def to_params(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = opt("", "run id, runs:/ or models:/ URI of a trained model")
    data: str = opt("", "prepare_data run id, dataset URI, or an image folder/archive path")
    split: str = opt("test", "train | val | test (an image folder: its test/ folder, else all images)")
    batch_size: int = opt(EVAL_BATCH, "images per inference batch")
    tta: bool = opt(False, "average predictions over the image and its horizontal flip")
    precision: str = opt("fp32", "fp32 (what the served model computes, so the metrics are its own) | bf16 | auto")
    device: str = opt("auto", "auto | cpu | cuda | cuda:K (the K-th visible GPU)")
    on_bad_image: str = opt("skip", "image folders: skip (and count) or fail on unreadable files")
    max_image_pixels: int = opt(DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_HELP)

    def __post_init__(self) -> None:
        if not self.model:
            raise PipelineError("model is empty; pass a pretrain/finetune run id or a runs:/ or models:/ URI")
        if not self.data:
            raise PipelineError("data is empty; pass a prepare_data run id, a dataset URI or an image folder")
        _choice("split", self.split, SPLITS)
        _choice("precision", self.precision, PRECISIONS)
        _device("device", self.device)
        _choice("on_bad_image", self.on_bad_image, ON_BAD_IMAGE)
        _pixel_limit(self.max_image_pixels)
        if self.batch_size < 1:
            raise PipelineError(f"batch_size={self.batch_size} must be an integer >= 1")


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
    augment: str = opt(
        "basic", "none | basic (random crop, padding 1/8 of the side, + flip) | strong (+ rotation and scale)"
    )
    precision: str = opt("auto", "auto (bf16 where the hardware has it) | bf16 | fp32")
    device: str = opt("auto", "auto | cpu | cuda | cuda:K (the K-th visible GPU)")
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


TABLE_SUFFIXES = (".csv", ".md")


@dataclass(frozen=True)
class CompareConfig:
    """Which runs `compare` puts in its table, the sort order, and the files it writes."""

    experiment: str = opt(
        "",
        "experiment name (or id) whose FINISHED runs to compare; default (no selection at all): the current experiment",
    )
    parent: str = opt("", "run id of a tune study's or main's parent run: compare its FINISHED descendants")
    runs: str = opt("", "run ids (training or evaluate runs) separated by spaces or commas, as RUN_ID arguments are")
    sort: str = opt(
        "", "metric to sort by, best first (lowest first for a *loss*); empty = test_f1_macro, else best_val_f1_macro"
    )
    output: str = opt("", "also write the table to FILE.csv (full precision) or FILE.md (Markdown)")
    plot: str = opt("", "write FILE.png: per-class F1 across runs, and frozen_layers vs macro F1")

    def __post_init__(self) -> None:
        given = [
            name
            for name, value in (("experiment", self.experiment), ("parent", self.parent), ("run ids", self.run_ids))
            if value
        ]
        if len(given) > 1:
            raise PipelineError(
                f"{' and '.join(given)} were both given; select runs with one of experiment, parent or run ids"
            )
        if self.output and not self.output.lower().endswith(TABLE_SUFFIXES):
            raise PipelineError(f"output {self.output!r} has an unknown format; name a .csv or .md file, e.g. runs.csv")
        if self.plot and not self.plot.lower().endswith(".png"):
            raise PipelineError(f"plot {self.plot!r} is not a .png file name; use e.g. compare.png")
        for path in (self.output, self.plot):
            folder = os.path.dirname(path) or "."
            if path and not os.path.isdir(folder):
                raise PipelineError(f"folder {folder!r} for {path!r} does not exist; create it or write elsewhere")

    @property
    def run_ids(self) -> list[str]:
        return list(dict.fromkeys(r for r in re.split(r"[\s,]+", self.runs) if r))
