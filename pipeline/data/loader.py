"""Batches straight from one uint8 tensor on the training device: no per-image Python work.

Augmentation is done per batch with tensor ops: a random crop of the zero-padded batch and a
horizontal flip are one gather; `strong` adds a random rotation and scale with affine_grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from pipeline.distributed import shard_range

# torchvision's ImageNet statistics: every model here (ImageNet weights or not) uses them, so a
# pretrained model and its fine-tuned child always agree on input scaling.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDING_FRACTION = 1 / 8  # of the image side: the classic 4 px at CIFAR's 32 px
STRONG_ROTATION_DEG = 15.0
STRONG_SCALE = (0.9, 1.1)


# (device, dtype) -> (mean, std) scaled to 0-255 pixels. Built once per device: building them from
# Python lists at every call is a host-to-device copy (and a sync) per batch on GPUs.
_STATS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def imagenet_stats(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the ImageNet statistics in 0-255 pixel units, cached per (device, dtype)."""
    key = (torch.device(device), dtype)
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=device) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device) * 255.0
        _STATS[key] = (mean.to(dtype), std.to(dtype))
    return _STATS[key]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) NHWC -> float NCHW (channels_last memory), scaled with the ImageNet statistics."""
    mean, std = imagenet_stats(x.device)
    # permute of a contiguous NHWC tensor *is* channels_last NCHW: no copy needed.
    return ((x.float() - mean) / std).permute(0, 3, 1, 2)


def prepare_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 NHWC images of any size -> the network's normalized image_size x image_size input.

    Resized before normalizing, as 0-255 floats: resizing and the per-channel scaling are both
    linear, so the result is the same as normalizing first, but a large image is never held as a
    float tensor at its full size *and* normalized. Antialiased bilinear, as the exported model did.
    """
    x = images.to(torch.uint8)
    if x.shape[1] != image_size or x.shape[2] != image_size:
        x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(image_size,) * 2, mode="bilinear", antialias=True)
        x = x.permute(0, 2, 3, 1)
    return normalize(x).contiguous(memory_format=torch.channels_last)


def crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random pad-and-crop plus horizontal flip of a uint8 NHWC batch, as one gather."""
    n, h, w, c = x.shape
    pad = max(1, round(h * CROP_PADDING_FRACTION))
    padded = x.new_zeros(n, h + 2 * pad, w + 2 * pad, c)
    padded[:, pad : pad + h, pad : pad + w] = x
    dev = x.device
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=gen)
    flip = torch.rand((n, 1), device=dev, generator=gen) < 0.5
    rows = dy + torch.arange(h, device=dev)
    cols = dx + torch.arange(w, device=dev)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def rotate_scale(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation and zoom of a float NCHW batch (bilinear, zero fill)."""
    n = x.shape[0]
    dev = x.device
    angle = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * math.radians(STRONG_ROTATION_DEG)
    lo, hi = STRONG_SCALE
    scale = lo + torch.rand(n, device=dev, generator=gen) * (hi - lo)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def iter_train_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, augment: str, gen: torch.Generator,
    aug_gen: torch.Generator | None = None, shard: tuple[int, int] = (0, 1), drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of augmented, normalized batches (the last one may be smaller).

    gen, a CPU generator, draws the permutation: on the CPU it is the same on every machine and GPU
    model (a CUDA randperm is not), so torchrun ranks on different GPUs agree on it. aug_gen (on the
    images' device; default gen, for images on the CPU) draws the augmentation. With shard=(rank,
    size), batch_size is the global batch: this rank gets its shard_range part of each one, and a
    last batch with fewer images than processes is left out (every rank must take every step).
    drop_last leaves out a short last batch (torch.compile: one batch shape, no recompiling).
    """
    order = torch.randperm(len(labels), generator=gen).to(images.device)
    aug_gen = gen if aug_gen is None else aug_gen
    rank, size = shard
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        if size > 1:
            if len(idx) < size:
                break
            lo, hi = shard_range(len(idx), rank, size)
            idx = idx[lo:hi]
        x = images[idx]
        if augment != "none":
            x = crop_flip(x, aug_gen)
        x = normalize(x)
        if augment == "strong":
            x = rotate_scale(x.contiguous(memory_format=torch.channels_last), aug_gen)
        yield x.contiguous(memory_format=torch.channels_last), labels[idx]


def iter_eval_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield normalize(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
