"""The vocabulary every step config shares: allowed values, the `opt` field helper, and the checks
whose messages say the fix. Kept free of torch, so configs import (and validate) in an instant.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, field, fields

from pipeline.errors import PipelineError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet9", "mobilenet_v3_small", "mobilenet_v3_large", "vgg11_bn",
         "airnet")
WEIGHTS = ("none", "imagenet")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "cuda:<K>")  # cuda:K = the K-th visible GPU (one per tune worker)
CUDA_INDEXED = re.compile(r"^cuda:[0-9]+$")
SCHEDULES = ("cosine", "onecycle", "plateau", "constant", "triangle")
AUGMENTS = ("none", "basic", "strong")
MONITORS = ("val_f1_macro", "val_accuracy", "val_loss")
SPLITS = ("train", "val", "test")
ON_BAD_IMAGE = ("skip", "fail")
IMPORTANCES = ("magnitude", "bn_scale", "taylor")  # how prune scores channels (pipeline.prune.pruning)
# PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS outright (it only warns above 1x), so this
# default keeps every image that PIL decodes by default decodable here.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
MAX_IMAGE_PIXELS_HELP = ("image folders: files with more pixels (width x height) are skipped undecoded, "
                         "as on_bad_image says; 0 = no limit")
NUM_STAGES = 5  # stem, layer1, layer2, layer3, layer4: what frozen_layers counts
# Images per inference forward pass (validation, evaluate, registry scoring). Defined here, not in
# pipeline.model.device, so that the configs stay importable without torch; pipeline.model.device re-exports it.
EVAL_BATCH = 512


def opt(default, help: str):
    """A config field whose help text is shown by the step's --help (one source of truth)."""
    return field(default=default, metadata={"help": help})


def same_as(config_cls, name: str, default=MISSING):
    """A field that means what `config_cls`'s field `name` means: its help, and its default unless given."""
    other = next(f for f in fields(config_cls) if f.name == name)
    return field(default=other.default if default is MISSING else default, metadata=other.metadata)


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

