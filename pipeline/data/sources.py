"""Read images from where users keep them: CIFAR-10, scikit-learn's digits, image folders, archives.

Folders and archives are read by pipeline.data.tree (layouts) and pipeline.data.images (one file).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.data.imageset import ImageSet
from pipeline.data.tree import (  # noqa: F401 (re-exported: callers import the readers from here)
    ARCHIVE_SUFFIXES,
    SPLIT_DIRS,
    ImageTree,
    SourceImages,
    choose_split,
    decode_tree,
    is_archive,
    read_image_tree,
    scan_image_tree,
)
from pipeline.errors import PipelineError


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 NHWC images to size x size with antialiased bilinear filtering."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def load_cifar10(data_dir: str, image_size: int) -> SourceImages:
    from torchvision.datasets import CIFAR10

    splits = {}
    try:
        for split, train in (("train", True), ("test", False)):
            ds = CIFAR10(root=data_dir, train=train, download=True)
            splits[split] = ImageSet(
                resize_images(np.ascontiguousarray(ds.data), image_size), np.asarray(ds.targets, np.int64)
            )
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad checksum is a RuntimeError
        raise PipelineError(
            f"could not download CIFAR-10 into {data_dir!r} ({type(exc).__name__}: {exc}); offline, copy "
            f"cifar-10-python.tar.gz into {data_dir!r}, or set source to a local image folder or archive"
        ) from exc
    return SourceImages(list(ds.classes), splits, [])


def load_digits(image_size: int) -> SourceImages:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped in the wheel), as RGB."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    images = resize_images(rgb, image_size)
    return SourceImages([str(n) for n in bunch.target_names], {"train": ImageSet(images, bunch.target.astype(np.int64))}, [])


def check_class_subset(wanted: list[str], available: list[str]) -> None:
    """Refuse a class subset that names unknown classes or fewer than two, before anything is decoded."""
    missing = [c for c in wanted if c not in available]
    if missing:
        raise PipelineError(f"classes {', '.join(missing)} not in the source; available: {', '.join(available)}")
    if wanted and len(set(wanted)) < 2:
        raise PipelineError("classes must name at least two distinct classes (or be empty for all)")


def _check_training_tree(tree: ImageTree) -> None:
    if "train" not in tree.files:
        found = ", ".join(s + "/" for s in tree.split_names)
        raise PipelineError(
            f"{tree.path!r} has no train/ split (it has {found}); prepare_data needs train/<class>/<image>, "
            "or <class>/<image> folders without split folders"
        )
    if len(tree.class_names) < 2:
        raise PipelineError(
            f"image folder {tree.path!r} has only one class folder ({tree.class_names[0]!r}); "
            "a classifier needs at least two, one subfolder per class"
        )


def load_source(
    source: str,
    data_dir: str,
    image_size: int,
    on_bad_image: str = "skip",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    classes: list[str] | None = None,
) -> SourceImages:
    """The source's images; a folder or archive is checked (train/, two classes, `classes`) before decoding."""
    if source == "cifar10":
        return load_cifar10(data_dir, image_size)
    if source == "digits":
        return load_digits(image_size)
    tree = scan_image_tree(source)
    _check_training_tree(tree)
    check_class_subset(classes or [], tree.class_names)
    return decode_tree(tree, image_size, on_bad_image, max_image_pixels)
