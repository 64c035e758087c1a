"""Checkpoints: what a resumable one holds, written atomically (by time: CheckpointSchedule), read
back without unpickling arbitrary objects."""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable

import torch

from pipeline.errors import PipelineError
from pipeline.train.state import LoopState


# The checkpoint's contents: checkpoint_state writes exactly the keys restore_state reads. The keys
# are a format: checkpoints of runs interrupted before a change must still resume after it. No
# random generator state: fit() seeds every epoch's draws from (seed, epoch[, rank]).
def checkpoint_state(loop: LoopState) -> dict:
    """Everything fit() needs to continue after `loop.epoch` as if it had never stopped."""
    return {
        "model": loop.net.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict() if loop.scheduler is not None else None,
        "ema": loop.ema.state_dict() if loop.ema is not None else None,
        "epoch": loop.epoch,
        "best_value": loop.best_value,
        "best_model": loop.best_model,
        "history": loop.history,
        "stale_epochs": loop.stale_epochs,
    }


def restore_state(loop: LoopState, state: dict) -> None:
    """Put a checkpoint_state dict back into a freshly set-up loop (same config, same net)."""
    loop.net.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    if loop.scheduler is not None and state.get("scheduler"):
        loop.scheduler.load_state_dict(state["scheduler"])
    if loop.ema is not None and state.get("ema"):
        loop.ema.load_state_dict(state["ema"])
    # "generator" / "torch_rng" of checkpoints written before draws were seeded per epoch are
    # ignored: a CUDA generator's state does not even fit a CPU generator.
    loop.epoch = state["epoch"]
    loop.best_value, loop.best_model = state["best_value"], state["best_model"]
    loop.history, loop.stale_epochs = list(state["history"]), state["stale_epochs"]
    loop.best_epoch = max((h["epoch"] for h in loop.history if h.get("is_best")), default=0)


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


class CheckpointSchedule:
    """Writes the resumable checkpoint by time: a full one (model, momentum, EMA and best weights,
    about 4x the model, fsynced) after every epoch is a large share of a seconds-long GPU epoch.

    Between writes the last finished epoch's state is kept as an in-memory copy on the device (a
    device-to-device copy), which write_pending() puts on disk when training is interrupted.
    final_needed() is asked after the last epoch: False skips that write (the caller deletes the file
    once fit() returns and uploads nothing now), unless training is stopped before fit() returns.
    """

    def __init__(self, path: str | None, every_s: float, clock: Callable[[], float] = time.monotonic,
                 final_needed: Callable[[], bool] | None = None):
        self.path, self.every_s, self.clock = path, every_s, clock
        self.final_needed = final_needed or (lambda: True)
        self.last_write = clock()
        self.pending: dict | None = None

    def after_epoch(self, state: LoopState, final: bool) -> None:
        if not self.path:
            return
        if final and not self.final_needed():
            # Nobody reads the last epoch's checkpoint unless training is stopped before fit() returns:
            # keep it for write_pending. No copy: no optimizer step follows the last epoch.
            self.pending = checkpoint_state(state)
            return
        if final or self.every_s <= 0 or self.clock() - self.last_write >= self.every_s:
            self.pending = None
            self._write(checkpoint_state(state))
        else:  # the live tensors change in the next step: keep a copy of this epoch's
            self.pending = copy.deepcopy(checkpoint_state(state))

    def write_pending(self) -> None:
        """Put the last finished epoch's state on disk, if it is not there yet."""
        if self.path and self.pending is not None:
            self._write(self.pending)
            self.pending = None

    def _write(self, ckpt: dict) -> None:
        save_atomic(ckpt, self.path)
        self.last_write = self.clock()
