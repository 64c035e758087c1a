"""Read images from where users keep them: CIFAR-10, scikit-learn's digits, image folders, archives.

Archives are read member by member in memory, never extracted, so a hostile member name cannot
write outside anything; such members are still refused outright, since an archive that contains
them was not made for this tool.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.data.imageset import ImageSet
from pipeline.errors import PipelineError

SPLIT_DIRS = ("train", "val", "test")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


@dataclass
class SourceImages:
    """What a source yields before any carving: its own splits (train, maybe test) and names."""

    class_names: list[str]
    splits: dict[str, ImageSet]
    skipped_files: list[str]


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


def _check_member_name(archive: str, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise PipelineError(
            f"archive {archive} holds member {name!r} that escapes the target folder; refusing it. "
            "Rebuild the archive with relative paths inside one folder"
        )


def _refuse_link(archive: str, name: str) -> None:
    raise PipelineError(
        f"archive {archive} holds link {name!r}; links are refused because they can point outside the "
        "folder. Rebuild the archive with plain files"
    )


def _iter_tar(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    with tarfile.open(path, "r:*") as tf:
        for member in tf:
            _check_member_name(path, member.name)
            if member.issym() or member.islnk():
                _refuse_link(path, member.name)
            if member.isfile():
                f = tf.extractfile(member)
                yield member.name, f.read


def _iter_zip(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            _check_member_name(path, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                _refuse_link(path, info.filename)
            if not info.is_dir():
                yield info.filename, (lambda info=info: zf.read(info))


def _iter_folder(root: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            yield os.path.relpath(full, root), Path(full).read_bytes


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _iter_entries(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    if os.path.isdir(path):
        yield from _iter_folder(path)
    elif path.lower().endswith(".zip"):
        yield from _iter_zip(path)
    else:
        yield from _iter_tar(path)


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _strip_wrapper_dirs(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Drop leading folders every file shares (an archive of `mydata/cat/1.jpg` is `cat/1.jpg`)."""
    while paths and all(len(p) >= 3 for p in paths) and len({p[0] for p in paths}) == 1:
        if paths[0][0].lower() in SPLIT_DIRS:
            break
        paths = [p[1:] for p in paths]
    return paths


def _decode(data: bytes, image_size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def read_image_tree(path: str, image_size: int, on_bad_image: str = "skip") -> SourceImages:
    """Decode an ImageFolder-layout folder or archive: <class>/<img> or <split>/<class>/<img>."""
    if not os.path.exists(path):
        raise PipelineError(
            f"data source {path!r} does not exist; pass cifar10, digits, or an existing image folder or archive"
        )
    if os.path.isfile(path) and not is_archive(path):
        raise PipelineError(
            f"data source {path!r} is a file but not a .tar, .tar.gz, .tgz or .zip archive; "
            "pass an image folder or one of those archives"
        )
    raw: dict[tuple[str, ...], bytes] = {}
    try:
        for name, read in _iter_entries(path):
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if not _is_hidden(parts):
                # Archives stream: read bytes now, while the member is current.
                raw[parts] = read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise PipelineError(
            f"archive {path!r} is truncated or not a valid archive ({type(exc).__name__}: {exc}); "
            "re-download or re-create it"
        ) from exc
    stripped = _strip_wrapper_dirs(list(raw))
    entries = list(zip(stripped, raw.values()))
    split_layout = bool(entries) and all(p[0].lower() in SPLIT_DIRS for p, _ in entries if len(p) >= 3)
    split_layout = split_layout and any(len(p) >= 3 for p, _ in entries)

    grouped: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    skipped: list[str] = []
    for parts, data in entries:
        if split_layout and len(parts) >= 3:
            split, cls = parts[0].lower(), parts[1]
        elif not split_layout and len(parts) >= 2:
            split, cls = "train", parts[0]
        else:
            skipped.append("/".join(parts))  # a file outside any class folder
            continue
        grouped.setdefault(split, {}).setdefault(cls, []).append(("/".join(parts), data))
    if "train" not in grouped:
        raise PipelineError(
            f"image folder {path!r} has no class subfolders; expected {path}/<class>/<image> "
            f"or {path}/train/<class>/<image>"
        )
    class_names = sorted(grouped["train"])
    if len(class_names) < 2:
        raise PipelineError(
            f"image folder {path!r} has only one class folder ({class_names[0]!r}); "
            "a classifier needs at least two, one subfolder per class"
        )
    splits: dict[str, ImageSet] = {}
    for split, by_class in grouped.items():
        unknown = sorted(set(by_class) - set(class_names))
        if unknown:
            raise PipelineError(
                f"{split}/ in {path!r} has classes not in train/: {', '.join(unknown)}; "
                "give every split the same class folders"
            )
        images, labels = [], []
        for label, cls in enumerate(class_names):
            for name, data in by_class.get(cls, []):
                try:
                    images.append(_decode(data, image_size))
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    if on_bad_image == "fail":
                        raise PipelineError(
                            f"{name} in {path!r} is not a readable image ({exc}); remove it "
                            "or set on_bad_image=skip"
                        ) from exc
                    skipped.append(name)
                    continue
                labels.append(label)
        if images:
            splits[split] = ImageSet(np.stack(images), np.asarray(labels, np.int64))
    if "train" not in splits:
        raise PipelineError(f"no readable images under {path!r}; check that the files are JPEG/PNG images")
    return SourceImages(class_names, splits, skipped)


def load_source(source: str, data_dir: str, image_size: int, on_bad_image: str) -> SourceImages:
    if source == "cifar10":
        return load_cifar10(data_dir, image_size)
    if source == "digits":
        return load_digits(image_size)
    return read_image_tree(source, image_size, on_bad_image)
