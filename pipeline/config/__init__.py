"""One frozen dataclass per step, validated on construction with messages that say the fix.

Validation happens here, before any expensive work (decoding images, opening a study). The
configs generate the steps' command lines (steps/_cli.config_options): each option's help and
default are written once, on its field.

    recipes   each arch's training recipe: what its options left at auto (None) resolve to
    base      allowed values, the `opt`/`same_as` field helpers, the checks
    steps     PrepareConfig, TrainConfig (pretrain, finetune), PruneConfig, EvaluateConfig
    tune      TuneConfig
    compare   CompareConfig
    transfer  TransferConfig (the transfer study: pretrain on some classes, fine-tune on others)

May import: only the shared top-level modules (errors, pareto's pick rule); no torch, mlflow or
optuna, no other pipeline package.
"""

from pipeline.config.base import (
    ARCHS,
    AUGMENTS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEVICES,
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
    opt,
    same_as,
)
from pipeline.config.compare import TABLE_SUFFIXES, CompareConfig
from pipeline.config.recipes import AUTO, RECIPE_FIELDS, RECIPES, Recipe, recipe_of
from pipeline.config.steps import RECOVERY_OPTIONS, EvaluateConfig, PrepareConfig, PruneConfig, TrainConfig
from pipeline.config.transfer import TransferConfig
from pipeline.config.tune import PRUNERS, SAMPLERS, STUDY_NAME, TuneConfig

__all__ = [
    "ARCHS", "AUGMENTS", "AUTO", "DEFAULT_MAX_IMAGE_PIXELS", "DEVICES", "EVAL_BATCH", "IMPORTANCES",
    "MAX_IMAGE_PIXELS_HELP", "MONITORS", "NUM_STAGES", "ON_BAD_IMAGE", "OPTIMIZERS", "PRECISIONS", "PRUNERS",
    "RECIPES", "RECIPE_FIELDS", "RECOVERY_OPTIONS", "SAMPLERS", "SCHEDULES", "SPLITS", "STUDY_NAME", "TABLE_SUFFIXES",
    "WEIGHTS", "CompareConfig", "EvaluateConfig", "PrepareConfig", "PruneConfig", "Recipe", "TrainConfig",
    "TransferConfig", "TuneConfig", "opt", "recipe_of", "same_as",
]
