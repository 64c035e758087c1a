"""Resolving what a user passes for a dataset or a model (a run id, a runs:/ or models:/ URI, a folder)
into MLflow artifacts, downloading them, and refusing a run of the wrong kind with a pointer to the right one.

Reads MLflow only; pipeline.track.tracking writes what is read here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException

from pipeline.data.store import load_dataset
from pipeline.errors import PipelineError
from pipeline.track.tracking import DATASET_ARTIFACT, META_FILE, MODEL_ARTIFACTS, MODEL_NAME, TAG_STEP, WEIGHTS_FILE

RUN_ID = re.compile(r"^[0-9a-f]{32}$")

# What each step's run holds, for the error when a run id of the wrong kind is passed.
RUN_HOLDS = {"prepare_data": "a dataset", "pretrain": "a model", "finetune": "a model",
             "prune": "a model", "evaluate": "test results",
             "main": "a whole pipeline", "tune": "a study", "tune_worker": "one worker's share of a study"}
# Where a run of another kind points at the run that was probably meant: {step: {wanted: tag}}.
RUN_POINTERS = {
    "main": {"model": "pipeline.finetune_run", "dataset": "pipeline.prepare_data_run"},
    "tune": {"model": "pipeline.best_run_id"},
    "evaluate": {"model": "pipeline.upstream.model_run"},
    "pretrain": {"dataset": "pipeline.upstream.data"},
    "finetune": {"dataset": "pipeline.upstream.data"},
}


def _tracking_hint() -> str:
    return f"tracking store {mlflow.get_tracking_uri()}"


def get_run(run_id: str):
    try:
        return mlflow.get_run(run_id)
    except MlflowException as exc:
        raise PipelineError(
            f"no MLflow run {run_id!r} in {_tracking_hint()}; check the id in `mlflow ui` or set "
            "MLFLOW_TRACKING_URI to the store that holds it"
        ) from exc


def run_name_of(run_id: str) -> str:
    """A run's name, or "" when it is not in this store (a model from elsewhere)."""
    try:
        return mlflow.get_run(run_id).info.run_name or ""
    except MlflowException:
        return ""


def _require_kind(run_id: str, steps: tuple[str, ...], wanted: str, fix: str) -> None:
    """Refuse a run id of the wrong step (a dataset where a model is expected...) with a pointer to the
    right one. Runs this pipeline did not make (no step tag) pass: their artifacts are checked later."""
    tags = get_run(run_id).data.tags
    step = tags.get(TAG_STEP)
    if step is None or step in steps:
        return
    pointer = tags.get(RUN_POINTERS.get(step, {}).get(wanted, ""), "")
    hint = f" ({wanted} of this {step} run: {pointer})" if pointer else ""
    article = "an" if step[0] in "aeiou" else "a"
    holds = RUN_HOLDS.get(step, "not a pipeline step")
    raise PipelineError(f"run {run_id} is {article} {step} run ({holds}), not a {wanted}; pass {fix}{hint}")


def download(uri: str, what: str) -> str:
    """Download an artifact (folder or file) to a local path; a missing one is a PipelineError naming `what`."""
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"{what} {uri!r} was not found in {_tracking_hint()} ({exc.__class__.__name__}); "
                            "check the run id or URI") from exc


# --- loading once per worker ---

_shared: dict | None = None  # a reusing_loads() block's loaded references


@contextlib.contextmanager
def reusing_loads():
    """Within this block each dataset or model reference is downloaded and verified once: every trial
    of a tune worker trains on the same dataset from the same pretrained model. Artifacts of a run do
    not change once logged; callers copy what they modify (load_state_dict copies the weights)."""
    global _shared
    outer = _shared
    _shared = {} if outer is None else outer
    try:
        yield
    finally:
        _shared = outer


def _reused(key: tuple, load):
    if _shared is None:
        return load()
    if key not in _shared:
        _shared[key] = load()
    return _shared[key]


# --- datasets -----------------------------------------------------------------------------

def dataset_uri(ref: str) -> str:
    """A prepare_data run id, a runs:/ URI, another artifact URI, or a local dataset folder -> URI."""
    if RUN_ID.match(ref):
        _require_kind(ref, ("prepare_data",), "dataset", "a prepare_data run id")
        return f"runs:/{ref}/{DATASET_ARTIFACT}"
    return ref


def fetch_dataset_dir(ref: str) -> str:
    if os.path.isdir(ref):
        return ref
    return download(dataset_uri(ref), "dataset")


def load_dataset_ref(ref: str, splits=("train", "val", "test")):
    """Download (or open) and verify a dataset artifact; returns (DatasetSplits, manifest, uri)."""
    def load():
        ds, manifest = load_dataset(fetch_dataset_dir(ref), splits)
        return ds, manifest, dataset_uri(ref)

    return _reused(("dataset", ref, tuple(splits)), load)


# --- models -------------------------------------------------------------------------------

def model_uri(ref: str) -> str:
    if RUN_ID.match(ref):
        _require_kind(ref, ("pretrain", "finetune", "prune"), "model", "a pretrain, finetune or prune run id")
        return f"runs:/{ref}/{MODEL_NAME}"
    if ref.startswith(("runs:/", "models:/")) or os.path.isdir(ref):
        return ref
    raise PipelineError(f"model reference {ref!r} is neither a run id nor a runs:/ or models:/ URI nor a model folder")


def load_model_ref(ref: str) -> tuple[dict, dict]:
    """Fetch a logged model's weights and metadata: (state_dict, meta). meta has arch,
    num_classes, class_names, image_size, dropout and source_run_id."""
    state, meta = _reused(("model", ref), lambda: _load_model(ref))
    return state, dict(meta)


def _load_model(ref: str) -> tuple[dict, dict]:
    uri = model_uri(ref)
    path = Path(download(uri, "model"))
    folder = path / MODEL_ARTIFACTS
    if not (folder / META_FILE).is_file() and (path / "extra_files" / META_FILE).is_file():
        folder = path / "extra_files"  # models logged before the pyfunc (MLflow PyTorch flavor)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        kind = "a dataset" if (path / "manifest.json").is_file() else "not a model logged by this pipeline"
        raise PipelineError(f"{ref!r} is {kind}; pass a pretrain/finetune run id or its model URI")
    meta = json.loads(meta_path.read_text())
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    meta["source_run_id"] = mlmodel.get("run_id", "")
    meta["model_uri"] = uri
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return state, meta
