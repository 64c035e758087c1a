"""The pipeline steps' configs: prepare_data, pretrain/finetune, prune and evaluate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from pipeline.config.base import (
    ARCHS,
    AUGMENTS,
    DEFAULT_MAX_IMAGE_PIXELS,
    EVAL_BATCH,
    IMPORTANCES,
    MAX_IMAGE_PIXELS_HELP,
    MONITORS,
    NUM_STAGES,
    ON_BAD_IMAGE,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    SPLITS,
    WEIGHTS,
    _choice,
    _device,
    _fraction,
    _non_negative,
    _pixel_limit,
    _plain_name,
    _positive,
    opt,
    same_as,
)
from pipeline.config.recipes import RECIPE_FIELDS, recipe_of, recipe_opt
from pipeline.errors import PipelineError


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
        "resnet18 | resnet34 | resnet50 | resnet9 | mobilenet_v3_small | mobilenet_v3_large | vgg11_bn | airnet "
        "(airbench94's fast CIFAR net); finetune: auto = as pretrained",
    )
    weights: str = opt("none", "none | imagenet (torchvision's ImageNet weights, from the torch hub cache)")
    epochs: int = opt(10, "passes over the training split")
    batch_size: int | None = recipe_opt("batch_size", int, "images per optimizer step")
    lr: float | None = recipe_opt("lr", float, "peak learning rate")
    weight_decay: float | None = recipe_opt("weight_decay", float, "L2 penalty (SGD) / decoupled decay (AdamW)")
    optimizer: str = opt("sgd", "sgd (Nesterov momentum 0.9) | adamw")
    label_smoothing: float | None = recipe_opt("label_smoothing", float, "cross-entropy label smoothing, in [0, 1)")
    schedule: str | None = recipe_opt(
        "schedule", str, "cosine | onecycle | plateau (on the monitored metric) | constant | triangle (0.2 x lr "
                         "rising to lr over the warm-up, then down to 0.07 x lr)")
    warmup_epochs: float | None = recipe_opt("warmup_epochs", float,
                                             "warm-up length for cosine (linear from 0) and triangle, in epochs")
    patience: int = opt(0, "early stopping: epochs without improvement of `monitor` (0 = off)")
    monitor: str = opt("val_f1_macro", "validation metric that picks the best epoch")
    dropout: float = opt(0.0, "dropout before the classification head")
    augment: str = opt("basic", "none | basic (random crop, padding 1/8 of the side, + flip) | strong (+ rotation and "
                                "scale)")
    ema: float = opt(0.0, "weight EMA decay per step (0 = off), e.g. 0.999")
    tta: bool | None = recipe_opt("tta", bool, "flip test-time augmentation at validation")
    precision: str = opt("auto", "auto (bf16 where the hardware has it) | bf16 | fp32")
    device: str = opt("auto", "auto | cpu | cuda | cuda:K (the K-th visible GPU, e.g. one per tune worker)")
    compile: bool = opt(
        False, "torch.compile the model (pays off on GPUs for long runs); drops each epoch's short last batch"
    )
    checkpoint_every: float = opt(
        30.0,
        "seconds between writes of the resumable checkpoint (also after the last epoch when kept or uploaded "
        "then, and on interruption); 0 = every epoch",
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
        if self.schedule is not None:
            _choice("schedule", self.schedule, SCHEDULES)
        _choice("augment", self.augment, AUGMENTS)
        _choice("monitor", self.monitor, MONITORS)
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise PipelineError(f"epochs={self.epochs} must be an integer >= 1")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise PipelineError(f"batch_size={self.batch_size} must be an integer >= 1")
        for name, check in (("lr", _positive), ("weight_decay", _non_negative), ("label_smoothing", _fraction),
                            ("warmup_epochs", _non_negative)):
            if getattr(self, name) is not None:
                check(name, getattr(self, name))
        _fraction("dropout", self.dropout)
        _fraction("ema", self.ema)
        _non_negative("checkpoint_every", self.checkpoint_every)
        if self.patience < 0:
            raise PipelineError(f"patience={self.patience} must be >= 0 (0 = no early stopping)")
        if not 0 <= self.frozen_layers <= NUM_STAGES:
            raise PipelineError(
                f"frozen_layers={self.frozen_layers} is out of range; use 0 (train all) to {NUM_STAGES} (head only)"
            )
        if self.arch in ("resnet9", "airnet") and self.weights == "imagenet":
            raise PipelineError(f"arch={self.arch} has no ImageNet weights; use weights=none or a resnet arch")
        _plain_name("register_as", self.register_as)

    def resolved(self) -> TrainConfig:
        """This config with every recipe option left at auto (None) taken from the arch's recipe
        (pipeline.config.recipes): what trains, and what a run logs. Needs the arch (not auto)."""
        unset = {name: None for name in RECIPE_FIELDS if getattr(self, name) is None}
        if not unset:
            return self
        if self.arch == "auto":
            raise PipelineError(f"{', '.join(unset)} follow the arch's recipe, and arch=auto is not known yet; "
                                "resolve it from the pretrained model first")
        recipe = recipe_of(self.arch)
        return replace(self, **{name: recipe.value(name, self.epochs) for name in unset})

    def to_params(self) -> dict:
        return asdict(self)


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
    batch_size: int = same_as(TrainConfig, "batch_size")
    lr: float = same_as(TrainConfig, "lr", 0.01)
    weight_decay: float = same_as(TrainConfig, "weight_decay")
    optimizer: str = same_as(TrainConfig, "optimizer")
    label_smoothing: float = same_as(TrainConfig, "label_smoothing")
    schedule: str = same_as(TrainConfig, "schedule")
    warmup_epochs: float = same_as(TrainConfig, "warmup_epochs")
    patience: int = same_as(TrainConfig, "patience")
    monitor: str = same_as(TrainConfig, "monitor")
    augment: str = same_as(TrainConfig, "augment")
    ema: float = same_as(TrainConfig, "ema")
    precision: str = same_as(TrainConfig, "precision")
    device: str = same_as(TrainConfig, "device")
    seed: int = same_as(TrainConfig, "seed")
    system_metrics: bool = same_as(TrainConfig, "system_metrics")
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

    def resolved(self, arch: str) -> PruneConfig:
        """This config with the recovery options left at auto (None) taken from `arch`'s recipe."""
        recovery = self.recovery_config(arch).resolved()
        unset = [name for name in RECOVERY_OPTIONS if getattr(self, name) is None]
        return replace(self, **{name: getattr(recovery, name) for name in unset})

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
