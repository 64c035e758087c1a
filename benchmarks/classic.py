"""The training loop a practitioner writes from the PyTorch CIFAR-10 tutorial, as the baseline.

A torchvision-style Dataset hands out one PIL image at a time; per-image transforms crop, flip,
convert and normalize it; a DataLoader with two worker processes collates batches; fp32, Adam.
Nothing here is tuned: it is the reference the pipeline's loop is measured against.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# The per-channel statistics CIFAR-10 tutorials normalize with.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4  # pixels, the classic CIFAR augmentation
NUM_WORKERS = 2
LR = 1e-3


class CifarStyleDataset(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def classic_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomCrop(image_size, padding=CROP_PADDING),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def classic_throughput(
    net: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int, warmup: int, steps: int,
    device: torch.device, num_workers: int = NUM_WORKERS,
) -> float:
    """Images per second over `steps` training steps, after `warmup` steps of the same epoch."""
    n = (warmup + steps) * batch_size
    if len(labels) < n:
        raise ValueError(f"need {n} images for {warmup}+{steps} steps of {batch_size}, got {len(labels)}")
    ds = CifarStyleDataset(images[:n], labels[:n], classic_transform(images.shape[1]))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    running_loss = 0.0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        running_loss += loss.item()  # as the tutorial does, every step
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)
