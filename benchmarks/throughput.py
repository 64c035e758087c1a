"""Training throughput: the pipeline's own fit() against the classic loop, same net and data.

The pipeline side *is* the product: pipeline.train.loop.fit() on an ImageSet, i.e. the uint8 tensor
loader with batch augmentation (pipeline.data.loader.iter_train_batches), channels_last, and the
autocast dtype of the precision asked for (fp32, bf16, or auto: on CPU measured by
pipeline.model.precision). Its figure is fit()'s own `images_per_sec` of one epoch of `steps` batches,
measured after a warm-up fit() of `warmup` batches on the same net (oneDNN/cuDNN pick and cache
their kernels on first use).

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
from pipeline.model.device import resolve_amp_dtype, resolve_device
from pipeline.model.models import create_model
from pipeline.model.precision import resolve_cpu_amp_dtype
from pipeline.train.loop import fit

NUM_CLASSES = 10
IMAGE_SIZE = 32  # benchmarks.run's images
VAL_IMAGES = 64  # fit() needs a validation split; it is scored after the timed epoch, untimed
PIPELINE_LR = 1e-3  # AdamW, like the classic loop's Adam: the optimizer is not what is compared


@dataclass(frozen=True)
class Case:
    arch: str  # resnet18 | resnet50 | ...
    stem: str  # imagenet: torchvision's 7x7/2 conv + max-pool, as tutorials use at 32x32;
    #            small: the pipeline's 3x3/1 stem without max-pool (pipeline.model.models.create_model)
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


def resolve_precision(precision: str, arch: str, device: torch.device, batch_size: int) -> tuple[str, dict]:
    """The precision fit() trains in, and for auto on CPU the measured verdict behind it.

    auto on CPU is decided by pipeline.model.precision's measurement of the pipeline's network of `arch`
    at 32x32 (the pipeline's small-stem net, also for imagenet-stem cases); the timed fit() then
    runs with that choice, so its rate is what precision=auto trains at once it decides by measuring.
    """
    if precision != "auto" or device.type != "cpu":
        return precision, {}
    t0 = time.perf_counter()
    _, verdict = resolve_cpu_amp_dtype(arch, IMAGE_SIZE, batch_size, NUM_CLASSES)
    return verdict.choice, {
        "auto_choice": verdict.choice,
        "auto_measured_ratio": round(verdict.ratio, 2),
        "auto_measured_fp32_img_s": round(verdict.fp32_img_s, 1),
        "auto_measured_bf16_img_s": round(verdict.bf16_img_s, 1),
        "auto_measure_s": round(time.perf_counter() - t0, 2),
        "auto_cached": verdict.cached,
    }


def compare(
    case: Case, images: np.ndarray, labels: np.ndarray, batch_size: int = 128, rounds: int = 2,
    device: str = "auto", precisions: tuple[str, ...] = ("auto",), seed: int = 0,
) -> list[dict]:
    """Alternate classic and the pipeline at each precision `rounds` times; one record per precision
    with the medians of img/s and the ratio to the classic loop."""
    dev = resolve_device(device)
    need = (case.warmup + case.steps) * batch_size
    if len(labels) < need:
        raise ValueError(f"{case}: needs {need} images, got {len(labels)}")
    resolved = {p: resolve_precision(p, case.arch, dev, batch_size) for p in precisions}
    classic, pipeline = [], {p: [] for p in precisions}
    t0 = time.perf_counter()
    cudnn_default = torch.backends.cudnn.benchmark
    for _ in range(rounds):
        net = build_net(case.arch, case.stem, seed)
        classic.append(classic_throughput(net, images, labels, batch_size, case.warmup, case.steps, dev))
        for p in precisions:
            net = build_net(case.arch, case.stem, seed)
            pipeline[p].append(
                pipeline_throughput(net, images, labels, batch_size, case.warmup, case.steps, device, resolved[p][0])
            )
            torch.backends.cudnn.benchmark = cudnn_default  # fit() turns it on; the classic loop runs without
        del net
    c = statistics.median(classic)
    wall = round(time.perf_counter() - t0, 1)
    return [_record(case, c, classic, p, pipeline[p], resolved[p], dev, batch_size, rounds, wall) for p in precisions]


def _record(case, c, classic, precision, rates, resolved, dev, batch_size, rounds, wall) -> dict:
    trained, verdict = resolved
    amp = resolve_amp_dtype(trained, dev)
    p = statistics.median(rates)
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
        "precision": precision,
        "pipeline_precision": str(amp).replace("torch.", "") if amp else "fp32",
        **verdict,
        "classic_rounds_img_s": [round(v, 1) for v in classic],
        "pipeline_rounds_img_s": [round(v, 1) for v in rates],
        "wall_s": wall,
    }


def summarize_precisions(records: list[dict], cpu: dict) -> dict:
    """One line per case and CPU: fp32, bf16 and auto img/s side by side, with auto's verdict."""
    by = {r["precision"]: r for r in records}
    out = {"bench": "precision", **cpu, "arch": records[0]["arch"], "stem": records[0]["stem"]}
    out.update({f"{p}_img_s": by[p]["pipeline_img_s"] for p in ("fp32", "bf16", "auto") if p in by})
    if "auto" in by:
        out.update({k: v for k, v in by["auto"].items() if k.startswith("auto_")})
        out["auto_trains"] = by["auto"]["pipeline_precision"]
        for p in ("fp32", "bf16"):
            if p in by:
                out[f"auto_vs_{p}"] = round(by["auto"]["pipeline_img_s"] / by[p]["pipeline_img_s"], 2)
    return out
