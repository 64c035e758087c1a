"""Turn a source into train/val/test splits: class subset, stratified carving, per-class caps."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.config import PrepareConfig
from pipeline.data.imageset import DatasetSplits, ImageSet
from pipeline.data.sources import SourceImages, check_class_subset, load_source
from pipeline.errors import PipelineError


def _select_classes(src: SourceImages, wanted: list[str]) -> SourceImages:
    if not wanted:
        return src
    check_class_subset(wanted, src.class_names)
    keep = [i for i, c in enumerate(src.class_names) if c in wanted]  # source order is kept
    remap = np.full(len(src.class_names), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    splits = {}
    for name, s in src.splits.items():
        mask = remap[s.labels] >= 0
        splits[name] = ImageSet(s.images[mask], remap[s.labels[mask]])
    return SourceImages([src.class_names[i] for i in keep], splits, src.skipped_files)


def _carve(s: ImageSet, fraction: float, seed: int, what: str) -> tuple[ImageSet, ImageSet]:
    """Split off `fraction` of s, stratified by label; returns (rest, carved)."""
    idx = np.arange(len(s))
    if fraction <= 0:
        return s, s.subset(idx[:0])
    try:
        rest, carved = train_test_split(idx, test_size=fraction, stratify=s.labels, random_state=seed)
    except ValueError as exc:
        raise PipelineError(
            f"cannot carve a stratified {what} split of {fraction} from {len(s)} images ({exc}); "
            f"use more images per class or a different {what}_fraction"
        ) from exc
    return s.subset(np.sort(rest)), s.subset(np.sort(carved))


def _cap_per_class(s: ImageSet, cap: int, seed: int) -> ImageSet:
    if cap <= 0:
        return s
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(s.labels):
        idx = np.flatnonzero(s.labels == label)
        keep.append(rng.permutation(idx)[:cap])
    return s.subset(np.sort(np.concatenate(keep)))


def split_source(src: SourceImages, cfg: PrepareConfig) -> DatasetSplits:
    src = _select_classes(src, cfg.class_subset)
    train = src.splits["train"]
    test = src.splits.get("test")
    val = src.splits.get("val")
    if test is None:
        train, test = _carve(train, cfg.test_fraction, cfg.seed, "test")
    if val is None:
        # val_fraction is a share of all non-test images, whatever the source's layout.
        train, val = _carve(train, cfg.val_fraction, cfg.seed + 1, "val")
    train = _cap_per_class(train, cfg.samples_per_class, cfg.seed)
    return DatasetSplits(src.class_names, {"train": train, "val": val, "test": test})


def prepare_dataset(cfg: PrepareConfig) -> tuple[DatasetSplits, list[str]]:
    """Load the configured source and carve it; returns the splits and the skipped file names."""
    src = load_source(
        cfg.source, cfg.data_dir, cfg.image_size, cfg.on_bad_image, cfg.max_image_pixels, cfg.class_subset
    )
    return split_source(src, cfg), src.skipped_files
