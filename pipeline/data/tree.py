"""Image folders and archives in the layouts people keep: find the splits and classes, then decode.

Accepted, in a folder or a .tar/.tar.gz/.tgz/.zip: `<class>/<img>`, or `<split>/<class>/<img>` with
any subset of train/val/test, either inside one or more wrapper folders (as archives usually are).
Scanning reads the files and settles the layout, splits and class names before any decoding, so a
caller can refuse a tree (no train/, unknown classes, a missing split) before the expensive part.

Archives are read member by member in memory, never extracted, so a hostile member name cannot
write outside anything; such members are still refused outright, since an archive that contains
them was not made for this tool.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.data.images import UnreadableImage, decode_image, own_pixel_limit
from pipeline.errors import PipelineError

SPLIT_DIRS = ("train", "val", "test")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
OS_CLUTTER = ("thumbs.db", "desktop.ini")  # written by Windows Explorer into any folder it shows
PLAIN_SPLIT = "train"  # a tree without split folders is one split, the one prepare_data trains on


@dataclass
class SourceImages:
    """What a source yields before any carving: its own splits (train, maybe val/test) and names."""

    class_names: list[str]
    splits: dict[str, ImageSet]
    skipped_files: list[str]  # "<file>: <reason>", one per file left out


@dataclass
class ImageTree:
    """A scanned folder or archive: files grouped by split and class, not yet decoded."""

    path: str
    class_names: list[str]
    files: dict[str, list[tuple[str, int, bytes]]]  # split -> [(file name, label, encoded bytes)]
    split_layout: bool  # True for <split>/<class>/<img>; False: all files form the PLAIN_SPLIT split
    skipped_files: list[str] = field(default_factory=list)

    @property
    def split_names(self) -> list[str]:
        return [s for s in SPLIT_DIRS if s in self.files]


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


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


def _iter_entries(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    if os.path.isdir(path):
        yield from _iter_folder(path)
    elif path.lower().endswith(".zip"):
        yield from _iter_zip(path)
    else:
        yield from _iter_tar(path)


def _is_ignored(parts: tuple[str, ...]) -> bool:
    """Hidden files, macOS resource forks and Windows thumbnails: never data, never worth a mention."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].lower() in OS_CLUTTER


def _check_source_path(path: str) -> None:
    if not os.path.exists(path):
        raise PipelineError(
            f"data source {path!r} does not exist; pass cifar10, digits, or an existing image folder or archive"
        )
    if os.path.isfile(path) and not is_archive(path):
        raise PipelineError(
            f"data source {path!r} is a file but not a .tar, .tar.gz, .tgz or .zip archive; "
            "pass an image folder or one of those archives"
        )


def _read_entries(path: str) -> dict[tuple[str, ...], bytes]:
    raw: dict[tuple[str, ...], bytes] = {}
    try:
        for name, read in _iter_entries(path):
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if parts and not _is_ignored(parts):
                raw[parts] = read()  # archives stream: read the bytes now, while the member is current
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise PipelineError(
            f"archive {path!r} is truncated or not a valid archive ({type(exc).__name__}: {exc}); "
            "re-download or re-create it"
        ) from exc
    return raw


def _top_dirs(paths: Collection[tuple[str, ...]]) -> set[str]:
    return {p[0] for p in paths if len(p) >= 2}


def _find_root(raw: dict[tuple[str, ...], bytes]) -> tuple[dict[tuple[str, ...], bytes], list[str]]:
    """Step into wrapper folders: while the top holds one folder (not a split) with class folders in it.

    Loose files beside a wrapper (a README next to `mydata/`) are left out and listed."""
    loose: list[str] = []
    while True:
        tops = _top_dirs(raw)
        if len(tops) != 1 or next(iter(tops)).lower() in SPLIT_DIRS or not any(len(p) >= 3 for p in raw):
            return raw, loose
        loose += ["/".join(p) + ": outside any class folder" for p in raw if len(p) < 2]
        raw = {p[1:]: data for p, data in raw.items() if len(p) >= 2}


def _is_split_layout(paths: Collection[tuple[str, ...]]) -> bool:
    tops = _top_dirs(paths)
    return bool(tops) and all(t.lower() in SPLIT_DIRS for t in tops) and any(len(p) >= 3 for p in paths)


def _place(parts: tuple[str, ...], split_layout: bool) -> tuple[str, str] | None:
    """(split, class) of a file, or None for a file outside any class folder."""
    if split_layout:
        return (parts[0].lower(), parts[1]) if len(parts) >= 3 else None
    return (PLAIN_SPLIT, parts[0]) if len(parts) >= 2 else None


def _check_splits_share_classes(path: str, by_split: dict[str, dict[str, list]]) -> None:
    """val/ and test/ may hold fewer classes than train/, never others: a model cannot learn those."""
    if "train" not in by_split:
        return
    for split, by_class in by_split.items():
        unknown = sorted(set(by_class) - set(by_split["train"]))
        if unknown:
            raise PipelineError(
                f"{split}/ in {path!r} has classes not in train/: {', '.join(unknown)}; "
                "give every split the same class folders"
            )


def scan_image_tree(path: str) -> ImageTree:
    """Read a folder or archive and settle its layout, splits and class names; decodes nothing."""
    _check_source_path(path)
    raw, skipped = _find_root(_read_entries(path))
    split_layout = _is_split_layout(raw)
    by_split: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for parts, data in raw.items():
        place = _place(parts, split_layout)
        if place is None:
            skipped.append("/".join(parts) + ": outside any class folder")
            continue
        by_split.setdefault(place[0], {}).setdefault(place[1], []).append(("/".join(parts), data))
    if not by_split:
        raise PipelineError(
            f"image folder {path!r} has no class subfolders; expected {path}/<class>/<image> "
            f"or {path}/<split>/<class>/<image> with split train, val or test"
        )
    _check_splits_share_classes(path, by_split)
    class_names = sorted({cls for by_class in by_split.values() for cls in by_class})
    label = {cls: i for i, cls in enumerate(class_names)}
    files = {
        split: [(name, label[cls], data) for cls in sorted(by_class) for name, data in by_class[cls]]
        for split, by_class in by_split.items()
    }
    return ImageTree(path, class_names, files, split_layout, skipped)


def choose_split(tree: ImageTree, wanted: str) -> str:
    """The split to score: `wanted` when the tree has it, else the tree's only split; else an error."""
    found = tree.split_names
    if wanted in found:
        return wanted
    if len(found) == 1:
        return found[0]
    raise PipelineError(
        f"{tree.path!r} has no {wanted}/ split; it has {', '.join(s + '/' for s in found)}: "
        f"set split to one of {', '.join(found)}"
    )


def _decode_files(files, image_size: int, on_bad_image: str, max_pixels: int, where: str):
    images, labels, skipped = [], [], []
    for name, label, data in files:
        try:
            images.append(decode_image(data, image_size, max_pixels))
        except UnreadableImage as exc:
            if on_bad_image == "fail":
                raise PipelineError(
                    f"{name} in {where!r} is not a readable image ({exc}); remove it or set on_bad_image=skip"
                ) from None
            skipped.append(f"{name}: {exc}")
            continue
        labels.append(label)
    return images, labels, skipped


def decode_tree(
    tree: ImageTree,
    image_size: int,
    on_bad_image: str = "skip",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    splits: Collection[str] | None = None,
) -> SourceImages:
    """Decode the tree's splits (all, or those named) into ImageSets; unreadable files are skipped and listed."""
    out: dict[str, ImageSet] = {}
    skipped = list(tree.skipped_files)
    with own_pixel_limit():
        for split in tree.split_names:
            if splits is not None and split not in splits:
                continue
            files = tree.files[split]
            images, labels, bad = _decode_files(files, image_size, on_bad_image, max_image_pixels, tree.path)
            skipped += bad
            if images:
                out[split] = ImageSet(np.stack(images), np.asarray(labels, np.int64))
    if not out:
        raise PipelineError(
            f"no readable images under {tree.path!r} ({len(skipped)} files skipped, e.g. {skipped[0]}); "
            "check that the files are images (JPEG, PNG, WebP...)" if skipped else
            f"no images under {tree.path!r}; put images into one folder per class"
        )
    return SourceImages(tree.class_names, out, skipped)


def read_image_tree(
    path: str, image_size: int, on_bad_image: str = "skip", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> SourceImages:
    """Scan and decode every split of a folder or archive (see the module docstring for layouts)."""
    return decode_tree(scan_image_tree(path), image_size, on_bad_image, max_image_pixels)
