"""Training throughput: the pipeline's own fit() against the classic loop, same net and data.

The pipeline side *is* the product: pipeline.train.fit() on an ImageSet, i.e. the uint8 tensor
loader with batch augmentation (pipeline.data.loader.iter_train_batches), channels_last, and the
autocast dtype pipeline.device.resolve_amp_dtype picks for the hardware. Its figure is fit()'s own
`images_per_sec` of one epoch of `steps` batches, measured after a warm-up fit() of `warmup`
batches on the same net (oneDNN/cuDNN pick and cache their kernels on first use).

The classic side (benchmarks.classic) runs `warmup` steps, then times `steps` more steps of the
same DataLoader epoch. Both use the same batch size, the same freshly initialised net (same seed)
and the same uint8 images; the two are alternated (classic, pipeline, classic, pipeline...) so a
machine that gets busier or cooler in between penalizes both, and the median of the rounds is
reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import nn

from benchmarks.classic import classic_throughput
from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.models import create_model
from pipeline.device import resolve_amp_dtype, resolve_device
from pipeline.train import fit

NUM_CLASSES = 10
VAL_IMAGES = 64  # fit() needs a validation split; it is scored after the timed epoch, untimed
PIPELINE_LR = 1e-3  # AdamW, like the classic loop's Adam: the optimizer is not what is compared


@dataclass(frozen=True)
class Case:
    arch: str  # resnet18 | resnet50 | ...
    stem: str  # imagenet: torchvision's 7x7/2 conv + max-pool, as tutorials use at 32x32;
    #            small: the pipeline's 3x3/1 stem without max-pool (pipeline.models.create_model)
    warmup: int  # steps before timing starts (per measurement)
    steps: int  # timed steps (per measurement)


# Step counts sized so that `make bench` stays within a few minutes on a 2-core CPU (~2-3 s per
# measurement; the small-stem ResNet-18 keeps 32x32 resolution into layer1 and takes ~7 s per
# 128-image step there). Short measurements, more rounds: a median of 3 survives one round hit
# by a burst of background load.
CPU_CASES = (
    Case("resnet18", "imagenet", warmup=2, steps=8),
    Case("resnet50", "imagenet", warmup=2, steps=4),
    Case("resnet18", "small", warmup=1, steps=1),
)


def build_net(arch: str, stem: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # both loops start from the same weights
    if stem == "small":
        return create_model(arch, NUM_CLASSES)
    if stem == "imagenet":
        return torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES)
    raise ValueError(f"unknown stem {stem!r}; use imagenet or small")


def pipeline_throughput(
    net: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int, warmup: int, steps: int,
    device: str = "auto", precision: str = "auto",
) -> float:
    """fit()'s images_per_sec over one epoch of `steps` batches, after a `warmup`-batch fit()."""
    cfg = TrainConfig(
        epochs=1, batch_size=batch_size, lr=PIPELINE_LR, optimizer="adamw", schedule="constant",
        augment="basic", precision=precision, device=device, seed=0,
    )
    val = ImageSet(images[:VAL_IMAGES], labels[:VAL_IMAGES])
    if warmup:
        n = warmup * batch_size
        fit(net, ImageSet(images[:n], labels[:n]), val, cfg, NUM_CLASSES)
    n = steps * batch_size
    result = fit(net, ImageSet(images[:n], labels[:n]), val, cfg, NUM_CLASSES)
    return result.history[-1]["images_per_sec"]


def compare(
    case: Case, images: np.ndarray, labels: np.ndarray, batch_size: int = 128, rounds: int = 2,
    device: str = "auto", precision: str = "auto", seed: int = 0,
) -> dict:
    """Alternate classic and pipeline `rounds` times; medians of img/s and their ratio."""
    dev = resolve_device(device)
    need = (case.warmup + case.steps) * batch_size
    if len(labels) < need:
        raise ValueError(f"{case}: needs {need} images, got {len(labels)}")
    classic, pipeline = [], []
    t0 = time.perf_counter()
    cudnn_default = torch.backends.cudnn.benchmark
    for _ in range(rounds):
        net = build_net(case.arch, case.stem, seed)
        classic.append(classic_throughput(net, images, labels, batch_size, case.warmup, case.steps, dev))
        net = build_net(case.arch, case.stem, seed)
        pipeline.append(pipeline_throughput(net, images, labels, batch_size, case.warmup, case.steps, device, precision))
        torch.backends.cudnn.benchmark = cudnn_default  # fit() turns it on; the classic loop runs without
        del net
    c, p = statistics.median(classic), statistics.median(pipeline)
    amp = resolve_amp_dtype(precision, dev)
    return {
        "arch": case.arch,
        "stem": case.stem,
        "classic_img_s": round(c, 1),
        "pipeline_img_s": round(p, 1),
        "ratio": round(p / c, 2),
        "batch_size": batch_size,
        "steps": case.steps,
        "rounds": rounds,
        "device": dev.type,
        "pipeline_precision": str(amp).replace("torch.", "") if amp else "fp32",
        "classic_rounds_img_s": [round(v, 1) for v in classic],
        "pipeline_rounds_img_s": [round(v, 1) for v in pipeline],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
