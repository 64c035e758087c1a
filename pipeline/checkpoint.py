"""Checkpoints written atomically and read back without unpickling arbitrary objects."""

from __future__ import annotations

import os
import tempfile

import torch

from pipeline.errors import PipelineError


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous checkpoint intact, never a half-written one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise PipelineError(f"checkpoint {path!r} does not exist; check the run id or path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, wrong format, or a pickle that needs arbitrary code
        raise PipelineError(f"checkpoint {path!r} cannot be read safely ({type(exc).__name__}); re-create it") from exc
