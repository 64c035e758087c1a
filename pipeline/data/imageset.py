"""In-memory image sets: the one representation every step works on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, (N, H, W, 3)
    labels: np.ndarray  # int64, (N,)

    def __post_init__(self) -> None:
        assert self.images.dtype == np.uint8 and self.images.ndim == 4 and self.images.shape[-1] == 3
        assert self.labels.dtype == np.int64 and len(self.labels) == len(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class DatasetSplits:
    class_names: list[str]
    splits: dict[str, ImageSet] = field(default_factory=dict)  # train / val / test

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(next(iter(self.splits.values())).images.shape[1])
