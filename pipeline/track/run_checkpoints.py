"""A training run's resumable checkpoint in MLflow: when it goes up, finding it, resuming from it, deleting it.

pipeline.train.checkpoint writes and reads the file itself (torch only); this module moves it to and from
the run's `checkpoints/` artifacts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.track.references import download, get_run
from pipeline.track.tracking import TAG_STEP
from pipeline.train.checkpoint import load_checkpoint

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
CHECKPOINT_UPLOAD_S = 60.0  # seconds between uploads of the resumable checkpoint to the run


def log_checkpoint(path: str) -> None:
    """Upload the epoch's resumable checkpoint (replacing the previous epoch's)."""
    mlflow.log_artifact(path, CHECKPOINT_DIR)


def has_checkpoint(run_id: str) -> bool:
    return any(a.path.endswith(LAST_CHECKPOINT) for a in MlflowClient().list_artifacts(run_id, CHECKPOINT_DIR))


def delete_checkpoints(run_id: str, artifact_uri: str = "") -> None:
    """Drop a finished run's resumable checkpoint (~100 MB for a ResNet-18 with its optimizer state).
    Best effort: stores that cannot delete keep it. artifact_uri (the run's, when known) saves a lookup."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        uri = artifact_uri or MlflowClient().get_run(run_id).info.artifact_uri
        get_artifact_repository(uri).delete_artifacts(CHECKPOINT_DIR)
    except (MlflowException, OSError, NotImplementedError):
        pass


def load_resume_point(run_id: str, step: str) -> tuple[dict, dict]:
    """(stored config, last checkpoint) of an interrupted run, for `resume`."""
    run = get_run(run_id)
    if run.data.tags.get(TAG_STEP) != step:
        kind = run.data.tags.get(TAG_STEP, "non-pipeline")
        raise PipelineError(f"run {run_id} is a {kind} run, not {step}; resume a {step} run")
    if run.info.status == "FINISHED":
        raise PipelineError(f"run {run_id} already FINISHED; nothing to resume (start a new run instead)")
    stored = yaml.safe_load(Path(download(f"runs:/{run_id}/config.yaml", "stored config")).read_text())
    try:
        ckpt = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"run {run_id} has no checkpoint to resume from (it stopped before its first epoch ended); "
                            "start it again") from exc
    return stored, load_checkpoint(ckpt)


class CheckpointUploads:
    """When the local checkpoint at `path` (rewritten by fit() every cfg.checkpoint_every seconds) goes up
    to the active run.

    Uploading costs ~0.3 s per 100 MB, so it goes up at most once every `every` seconds after an epoch,
    and only when fit() has written a newer one since; and on interruption, so that `resume` finds the
    last finished epoch. enabled=False keeps it local (tuning trials without heartbeats: ~100 MB each,
    never resumed).
    """

    def __init__(self, path: str | None, enabled: bool = True, every: float = CHECKPOINT_UPLOAD_S):
        self.path, self.enabled, self.every = path, enabled, every
        self._last = time.monotonic()
        self._uploaded_mtime: float | None = None

    def is_due(self) -> bool:
        """Whether a checkpoint written now would go up after this epoch."""
        return self.enabled and time.monotonic() - self._last >= self.every

    def after_epoch(self) -> None:
        if self.is_due() and self._has_new_checkpoint():
            self.upload_now()
            self._last = time.monotonic()

    def _has_new_checkpoint(self) -> bool:
        return bool(self.path) and os.path.exists(self.path) and os.path.getmtime(self.path) != self._uploaded_mtime

    def on_interrupt(self) -> None:
        if self.enabled:
            self.upload_now()

    def upload_now(self) -> None:
        """Upload the checkpoint now, if fit() wrote one (only rank 0 has a path)."""
        if self.path and os.path.exists(self.path):
            self._uploaded_mtime = os.path.getmtime(self.path)
            log_checkpoint(self.path)
