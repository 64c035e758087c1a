"""The dataset artifact: one .npy per array plus a manifest with the sha256 of each.

Layout of the folder (logged as the `dataset` artifact of a prepare_data run):
    manifest.json                 class names, source, seed, counts per class and split, sha256s
    {train,val,test}_images.npy   uint8 (N, H, W, 3)
    {train,val,test}_labels.npy   int64 (N,)
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from pipeline.data.imageset import DatasetSplits, ImageSet
from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_digest(manifest: dict) -> str:
    """A short digest of the data itself (the arrays' hashes), stable across re-logging."""
    joined = "".join(manifest["sha256"][k] for k in sorted(manifest["sha256"]))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def save_dataset(ds: DatasetSplits, out_dir: str, info: dict) -> dict:
    """Write the arrays and manifest into out_dir; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    sha = {}
    for split, s in ds.splits.items():
        for kind, arr in (("images", s.images), ("labels", s.labels)):
            fname = f"{split}_{kind}.npy"
            np.save(os.path.join(out_dir, fname), arr)
            sha[fname] = sha256_file(os.path.join(out_dir, fname))
    manifest = {
        "format_version": FORMAT_VERSION,
        "class_names": ds.class_names,
        "image_size": ds.image_size,
        "counts": {split: s.counts(ds.num_classes) for split, s in ds.splits.items()},
        "sha256": sha,
        **info,
    }
    manifest["digest"] = dataset_digest(manifest)
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise PipelineError(
            f"{path!r} holds no {MANIFEST}, so it is not a dataset artifact; pass a prepare_data run id "
            "or its runs:/<id>/dataset URI"
        )
    with open(mpath) as f:
        return json.load(f)


def load_dataset(path: str, splits: tuple[str, ...] = ("train", "val", "test")) -> tuple[DatasetSplits, dict]:
    """Load and verify (sha256 against the manifest) the requested splits of a dataset folder."""
    manifest = read_manifest(path)
    out = {}
    for split in splits:
        arrays = {}
        for kind in ("images", "labels"):
            fname = f"{split}_{kind}.npy"
            fpath = os.path.join(path, fname)
            expected = manifest["sha256"].get(fname)
            if expected is None or not os.path.isfile(fpath):
                raise PipelineError(f"dataset at {path!r} lacks {fname}; re-run prepare_data to rebuild it")
            if sha256_file(fpath) != expected:
                raise PipelineError(
                    f"{fname} in dataset {path!r} does not match its manifest sha256 (corrupted or edited); "
                    "re-run prepare_data to rebuild it"
                )
            arrays[kind] = np.load(fpath, allow_pickle=False)
        out[split] = ImageSet(arrays["images"], arrays["labels"])
    return DatasetSplits(list(manifest["class_names"]), out), manifest
