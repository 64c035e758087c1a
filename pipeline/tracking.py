"""The one place that talks to MLflow: runs, params, metrics, artifacts, and resolving references.

Tracking location and experiment follow MLflow's own rules: MLFLOW_TRACKING_URI (default
sqlite:///mlflow.db in the working directory) and MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import Schema, TensorSpec

from pipeline.checkpoint import load_checkpoint
from pipeline.data.store import load_dataset
from pipeline.plots import plot_confusion
from pipeline.errors import PipelineError
from pipeline.serving import META_ARTIFACT, WEIGHTS_ARTIFACT, predictions_frame

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
DATASET_ARTIFACT = "dataset"
MODEL_NAME = "model"
META_FILE = "model_meta.json"
WEIGHTS_FILE = "state_dict.pt"
MODEL_ARTIFACTS = "artifacts"  # where pyfunc puts a model's artifacts inside its folder
TAG_STEP = "pipeline.step"
TAG_CODE = "pipeline.code_version"
TAG_CACHE_KEY = "pipeline.cache_key"
# The network a training run built: its `arch` param says `auto` when finetune was launched by `mlflow run`
# with the default (MLflow logs the given params first, and a param cannot change).
TAG_ARCH = "pipeline.arch"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """sha256 over the project's Python sources: changes with any edit, committed or not."""
    h = hashlib.sha256()
    for folder in ("pipeline", "steps"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(PROJECT_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


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


# What each step's run holds, for the error when a run id of the wrong kind is passed.
RUN_HOLDS = {"prepare_data": "a dataset", "pretrain": "a model", "finetune": "a model", "evaluate": "test results",
             "main": "a whole pipeline", "tune": "a study", "tune_worker": "one worker's share of a study"}
# Where a run of another kind points at the run that was probably meant: {step: {wanted: tag}}.
RUN_POINTERS = {
    "main": {"model": "pipeline.finetune_run", "dataset": "pipeline.prepare_data_run"},
    "tune": {"model": "pipeline.best_run_id"},
    "evaluate": {"model": "pipeline.upstream.model_run"},
    "pretrain": {"dataset": "pipeline.upstream.data"},
    "finetune": {"dataset": "pipeline.upstream.data"},
}


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
    raise PipelineError(f"run {run_id} is {article} {step} run ({RUN_HOLDS.get(step, 'not a pipeline step')}), not a {wanted}; pass {fix}{hint}")


def _download(uri: str, what: str) -> str:
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"{what} {uri!r} was not found in {_tracking_hint()} ({exc.__class__.__name__}); check the run id or URI") from exc


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
    return _download(dataset_uri(ref), "dataset")


def load_dataset_ref(ref: str, splits=("train", "val", "test")):
    """Download (or open) and verify a dataset artifact; returns (DatasetSplits, manifest, uri)."""
    path = fetch_dataset_dir(ref)
    ds, manifest = load_dataset(path, splits)
    return ds, manifest, dataset_uri(ref)


class RunArtifactSource(DatasetSource):
    """Where a prepared dataset lives: a run artifact URI such as runs:/<run id>/dataset."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "run_artifact"

    def load(self, **kwargs) -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=self.uri)

    @staticmethod
    def _can_resolve(raw_source) -> bool:
        return False  # built explicitly, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source) -> "RunArtifactSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict) -> "RunArtifactSource":
        return cls(source_dict["uri"])


def _meta_dataset(manifest: dict, uri: str) -> MetaDataset:
    name = os.path.basename(str(manifest.get("source", "dataset")).rstrip("/")) or "dataset"
    return MetaDataset(source=RunArtifactSource(uri), name=name, digest=manifest["digest"])


def log_dataset(dataset_dir: str, manifest: dict) -> str:
    """Log the dataset folder as this run's `dataset` artifact and as an MLflow run input."""
    run_id = mlflow.active_run().info.run_id
    mlflow.log_artifacts(dataset_dir, DATASET_ARTIFACT)
    uri = f"runs:/{run_id}/{DATASET_ARTIFACT}"
    mlflow.log_input(_meta_dataset(manifest, uri), context="prepared")
    return uri


def log_dataset_input(manifest: dict, uri: str, context: str) -> None:
    mlflow.log_input(_meta_dataset(manifest, uri), context=context)


# --- models -------------------------------------------------------------------------------

def model_uri(ref: str) -> str:
    if RUN_ID.match(ref):
        _require_kind(ref, ("pretrain", "finetune"), "model", "a pretrain or finetune run id")
        return f"runs:/{ref}/{MODEL_NAME}"
    if ref.startswith(("runs:/", "models:/")) or os.path.isdir(ref):
        return ref
    raise PipelineError(f"model reference {ref!r} is neither a run id nor a runs:/ or models:/ URI nor a model folder")


def load_model_ref(ref: str) -> tuple[dict, dict]:
    """Fetch a logged model's weights and metadata: (state_dict, meta). meta has arch,
    num_classes, class_names, image_size, dropout and source_run_id."""
    uri = model_uri(ref)
    path = Path(_download(uri, "model"))
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


def log_model(classifier: torch.nn.Module, meta: dict, sample: np.ndarray) -> str:
    """Log the trained network as a pyfunc (pipeline.serving.ImageClassifierModel): uint8 images
    (N, H, W, 3) of any size in, class names and probabilities out. Its artifacts are the plain state
    dict and metadata, which later steps load with weights_only=True and no unpickling."""
    classifier = classifier.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, WEIGHTS_FILE)
        torch.save(classifier.net.state_dict(), weights)
        meta_path = os.path.join(tmp, META_FILE)
        Path(meta_path).write_text(json.dumps(meta, indent=2))
        with torch.no_grad():
            probs = torch.softmax(classifier(torch.from_numpy(sample)).float(), 1).numpy()
        # Any image size is accepted (resized inside), so H and W are left open in the signature.
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=infer_signature(sample, predictions_frame(probs, meta["class_names"])).outputs,
        )
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(PROJECT_ROOT / "pipeline" / "pyfunc_model.py"),
            artifacts={WEIGHTS_ARTIFACT: weights, META_ARTIFACT: meta_path},
            signature=signature,
            input_example=sample,
            code_paths=[str(PROJECT_ROOT / "pipeline")],
            pip_requirements=_pinned_requirements(),
        )
    return info.model_uri


def _pinned_requirements() -> list[str]:
    lines = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def log_evaluation(report, class_names: list[str], split: str, images: np.ndarray | None = None) -> None:
    """Metrics, the per-class CSV table, the text report, the confusion matrix (PNG + CSV), per-class
    precision-recall curves (PNG) and, given the images, the most confidently misclassified (PNG)."""
    from pipeline.plots import misclassified_grid, precision_recall_figure

    log_metrics(report.metrics)
    mlflow.log_text(report.per_class.to_csv(index=False), f"evaluation/{split}_per_class.csv")
    mlflow.log_text(report.report, f"evaluation/{split}_classification_report.txt")
    cm = report.confusion
    header = "true/predicted," + ",".join(class_names)
    rows = [f"{name}," + ",".join(str(int(v)) for v in cm[i]) for i, name in enumerate(class_names)]
    mlflow.log_text("\n".join([header, *rows]) + "\n", f"evaluation/{split}_confusion_matrix.csv")
    figures = {
        "confusion_matrix": plot_confusion(cm, class_names),
        "precision_recall": precision_recall_figure(report.labels, report.probabilities, class_names, report.average_precision),
    }
    if images is not None:
        figures["misclassified"] = misclassified_grid(images, report.labels, report.probabilities, class_names)
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        mlflow.log_figure(fig, f"evaluation/{split}_{name}.png")
        plt.close(fig)


# --- runs ---------------------------------------------------------------------------------

def param_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as MLproject parameters spell them
    return "" if value is None else str(value)


def log_params(params: dict) -> None:
    """Log params, skipping those `mlflow run` already logged as typed (e.g. lr=1e-2 vs 0.01):
    MLflow refuses to change a param, and the user's spelling is the one worth keeping."""
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: param_text(v) for k, v in params.items() if k not in existing})


def arch_of(run) -> str:
    """The architecture a training run built (arch=auto resolved), or "" for other runs."""
    return run.data.tags.get(TAG_ARCH) or run.data.params.get("arch", "")


def set_note(text: str) -> None:
    """The active run's description in the MLflow UI (Markdown)."""
    mlflow.set_tag("mlflow.note.content", text)


def run_name_of(run_id: str) -> str:
    """A run's name, or "" when it is not in this store (a model from elsewhere)."""
    try:
        return mlflow.get_run(run_id).info.run_name or ""
    except MlflowException:
        return ""


def log_config(params: dict, name: str = "config.yaml") -> None:
    mlflow.log_dict(params, name)


CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"


def log_checkpoint(path: str) -> None:
    """Upload the epoch's resumable checkpoint (replacing the previous epoch's)."""
    mlflow.log_artifact(path, CHECKPOINT_DIR)


def has_checkpoint(run_id: str) -> bool:
    return any(a.path.endswith(LAST_CHECKPOINT) for a in MlflowClient().list_artifacts(run_id, CHECKPOINT_DIR))


def delete_checkpoints(run_id: str) -> None:
    """Drop a finished run's resumable checkpoint (~100 MB for a ResNet-18 with its optimizer state).
    Best effort: stores that cannot delete keep it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(MlflowClient().get_run(run_id).info.artifact_uri).delete_artifacts(CHECKPOINT_DIR)
    except (MlflowException, OSError, NotImplementedError):
        pass


def load_resume_point(run_id: str, step: str) -> tuple[dict, dict]:
    """(stored config, last checkpoint) of an interrupted run, for `resume`."""
    run = get_run(run_id)
    if run.data.tags.get(TAG_STEP) != step:
        raise PipelineError(f"run {run_id} is a {run.data.tags.get(TAG_STEP, 'non-pipeline')} run, not {step}; resume a {step} run")
    if run.info.status == "FINISHED":
        raise PipelineError(f"run {run_id} already FINISHED; nothing to resume (start a new run instead)")
    stored = yaml.safe_load(Path(_download(f"runs:/{run_id}/config.yaml", "stored config")).read_text())
    try:
        ckpt = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"run {run_id} has no checkpoint to resume from (it stopped before its first epoch ended); start it again") from exc
    return stored, load_checkpoint(ckpt)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_metrics_to(run_id: str, metrics: dict) -> None:
    """Add metrics to a run that is not the active one (it may have ended: a tuning trial's)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


@contextlib.contextmanager
def step_run(step: str, run_name: str | None = None, tags: dict | None = None, nested: bool = False,
             stopped: tuple[type[BaseException], ...] = (), run_id: str | None = None,
             system_metrics: bool | None = None):
    """Start (or, under `mlflow run`, attach to) the step's run; end it FAILED on error, KILLED on Ctrl-C.

    Exceptions of the `stopped` types mean a deliberate early stop (Optuna pruning): the run ends KILLED.
    system_metrics: log MLflow's system/* metrics (CPU, memory, disk, network; GPU with pynvml) while
    the run is open; None leaves it to MLflow (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, default off).
    """
    if system_metrics:
        import logging

        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            # MLflow samples every 10 s and logs a point only after a full interval, so a run shorter
            # than that (a demo, a tuning trial on small data) would get none. 2 s gives a curve for
            # any run worth watching at one cheap psutil sample + one run lookup per 2 s; an hour-long
            # run gets 1800 points per metric. The environment variable, when set, wins.
            mlflow.set_system_metrics_sampling_interval(2)
        # Four INFO lines per run (started, no GPU, stopping, stopped) would drown tune's one line per trial.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # The name is set as a tag: under `mlflow run` this attaches to the launcher's run (MLFLOW_RUN_ID).
    # With run_id, an interrupted run is reopened (resume) instead of starting a new one.
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if run_id and launcher and launcher != run_id:
        _point_to(launcher, run_id, step)
    run = mlflow.start_run(run_id=run_id, nested=nested, tags={TAG_STEP: step, TAG_CODE: code_version(), **(tags or {})},
                           log_system_metrics=system_metrics)
    if run_name:
        mlflow.set_tag("mlflow.runName", run_name)
    with ending_run(stopped):
        yield run


def _point_to(launcher_run: str, resumed_run: str, step: str) -> None:
    """`mlflow run -P resume=ID` made a run of its own before the step reopened run ID: name that
    launcher run for what it is, a pointer, so nobody takes it for a failed or empty training."""
    client = MlflowClient()
    client.set_tag(launcher_run, "mlflow.runName", f"{step} resume -> {resumed_run[:8]}")
    client.set_tag(launcher_run, "pipeline.resumed_run", resumed_run)
    client.set_tag(launcher_run, "mlflow.note.content", f"Resumed run {resumed_run}; its metrics and model are there.")


@contextlib.contextmanager
def ending_run(stopped: tuple[type[BaseException], ...] = ()):
    """End the active run as its block ends: FINISHED, KILLED (Ctrl-C, SIGTERM, `stopped`), or FAILED."""
    try:
        yield
    except (KeyboardInterrupt, *stopped):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def cache_key(step: str, params: dict, upstream: dict) -> str:
    blob = json.dumps({"step": step, "params": params, "upstream": upstream, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def find_finished_run(key: str, experiment_id: str) -> str | None:
    """The newest FINISHED run tagged with this cache key, if any."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None

