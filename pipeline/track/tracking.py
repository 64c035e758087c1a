"""Writing a step's MLflow run: starting and ending it, params, metrics, notes, the dataset and the model.

Tracking location and experiment follow MLflow's own rules: MLFLOW_TRACKING_URI (default
sqlite:///mlflow.db in the working directory) and MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID.
Reading runs back (run ids, URIs, downloads) is pipeline.track.references; the other modules that talk to
MLflow are listed in docs/development.md (Layout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from pipeline.track import pyfunc_template
from pipeline.track.preflight import TrackingLost
from pipeline.track.serving import META_ARTIFACT, WEIGHTS_ARTIFACT, predictions_frame

DATASET_ARTIFACT = "dataset"
MODEL_NAME = "model"
META_FILE = "model_meta.json"
WEIGHTS_FILE = "state_dict.pt"
MODEL_ARTIFACTS = "artifacts"  # where pyfunc puts a model's artifacts inside its folder
TAG_STEP = "pipeline.step"
TAG_CODE = "pipeline.code_version"
# The network a training run built: its `arch` param says `auto` when finetune was launched by `mlflow run`
# with the default (MLflow logs the given params first, and a param cannot change).
TAG_ARCH = "pipeline.arch"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """sha256 over the project's Python sources: changes with any edit, committed or not."""
    h = hashlib.sha256()
    for folder in ("pipeline", "steps"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(PROJECT_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# --- datasets -----------------------------------------------------------------------------

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


def log_model(classifier: torch.nn.Module, meta: dict, sample: np.ndarray, with_example: bool = True) -> str:
    """Log the trained network as a pyfunc (pipeline.track.serving.ImageClassifierModel): uint8 images
    (N, H, W, 3) of any size in, class names and probabilities out. Its artifacts are the plain state
    dict and metadata, which later steps load with weights_only=True and no unpickling. meta's
    "temperature" (None or absent: 1.0) divides the logits before the served softmax.

    with_example=False (tuning trials) logs no input example, which MLflow would load the saved model
    again to predict (about a second a model on a CPU), and copies the pyfunc folder this process
    saved for its first such model (pipeline.track.pyfunc_template) instead of building it again."""
    net = classifier.cpu().eval().net
    signature = model_signature(sample, meta["class_names"])
    if not with_example:
        return _log_from_template(net, meta, signature)
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta_path = os.path.join(tmp, WEIGHTS_FILE), os.path.join(tmp, META_FILE)
        write_model_files({WEIGHTS_ARTIFACT: weights, META_ARTIFACT: meta_path}, net, meta)
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, signature=signature, input_example=sample,
                                       **_pyfunc_args(weights, meta_path))
    return info.model_uri


def model_signature(sample: np.ndarray, class_names: list[str]) -> ModelSignature:
    """Any image size is accepted (resized inside), so H and W are left open; the outputs are
    predictions_frame's columns (their types do not depend on the probabilities' values)."""
    probs = np.full((len(sample), len(class_names)), 1 / len(class_names), np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=infer_signature(sample, predictions_frame(probs, class_names)).outputs,
    )


def write_model_files(paths: dict[str, str | Path], net: torch.nn.Module, meta: dict) -> None:
    """The model's two artifacts, by pyfunc artifact name: the state dict and the metadata."""
    torch.save(net.state_dict(), paths[WEIGHTS_ARTIFACT])
    Path(paths[META_ARTIFACT]).write_text(json.dumps(meta, indent=2))


def _pyfunc_args(weights: str, meta_path: str) -> dict:
    return dict(
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={WEIGHTS_ARTIFACT: weights, META_ARTIFACT: meta_path},
        code_paths=[str(PROJECT_ROOT / "pipeline")],
        pip_requirements=_pinned_requirements(),
    )


def _log_from_template(net: torch.nn.Module, meta: dict, signature: ModelSignature) -> str:
    def save(path: str) -> None:  # the first model's files make the folder; each model replaces them
        with tempfile.TemporaryDirectory() as tmp:
            weights, meta_path = os.path.join(tmp, WEIGHTS_FILE), os.path.join(tmp, META_FILE)
            write_model_files({WEIGHTS_ARTIFACT: weights, META_ARTIFACT: meta_path}, net, meta)
            mlflow.pyfunc.save_model(path, signature=signature, **_pyfunc_args(weights, meta_path))

    # The folder depends on the code it ships and the requirements it pins, not on the weights.
    template = pyfunc_template.template_dir((code_version(), tuple(_pinned_requirements())), save)
    flavor = pyfunc_template.TemplateFlavor(template, lambda paths: write_model_files(paths, net, meta), signature)
    info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=flavor, flavor_name=pyfunc_template.PYFUNC_FROM_CODE)
    return info.model_uri


def _pinned_requirements() -> list[str]:
    lines = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


# --- runs ---------------------------------------------------------------------------------

def param_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as MLproject parameters spell them
    return "" if value is None else str(value)


# run id -> its params as far as this process knows them: what the run had when step_run started or
# reopened it, plus what log_params logged since (saves a run lookup per log_params call).
_known_params: dict[str, dict[str, str]] = {}
# run id -> the name this process last gave it (saves a lookup for tune's trial names)
_given_names: dict[str, str] = {}


def log_params(params: dict) -> None:
    """Log params, skipping those `mlflow run` already logged as typed (e.g. lr=1e-2 vs 0.01):
    MLflow refuses to change a param, and the user's spelling is the one worth keeping."""
    run_id = mlflow.active_run().info.run_id
    if run_id not in _known_params:
        _known_params[run_id] = dict(mlflow.get_run(run_id).data.params)
    existing = _known_params[run_id]
    new = {k: param_text(v) for k, v in params.items() if k not in existing}
    mlflow.log_params(new)
    existing.update(new)


def set_run_name(name: str, tags: dict | None = None) -> None:
    """Name the active run, with other tags in the same call."""
    mlflow.set_tags({**(tags or {}), "mlflow.runName": name})
    _given_names[mlflow.active_run().info.run_id] = name


def name_given(run_id: str) -> str | None:
    """The name this process gave the run (step_run, set_run_name), or None."""
    return _given_names.get(run_id)


def arch_of(run) -> str:
    """The architecture a training run built (arch=auto resolved), or "" for other runs."""
    return run.data.tags.get(TAG_ARCH) or run.data.params.get("arch", "")


def set_note(text: str) -> None:
    """The active run's description in the MLflow UI (Markdown)."""
    mlflow.set_tag("mlflow.note.content", text)


def log_config(params: dict, name: str = "config.yaml") -> None:
    mlflow.log_dict(params, name)


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
    tags = {TAG_STEP: step, TAG_CODE: code_version(), **(tags or {})}
    run = mlflow.start_run(run_id=run_id, nested=nested, tags=tags, run_name=run_name or None,
                           log_system_metrics=system_metrics)
    _known_params[run.info.run_id] = dict(run.data.params)  # start_run read (or created) the run
    if run_name:
        _given_names[run.info.run_id] = run_name
    with ending_run(stopped):
        yield run


def _point_to(launcher_run: str, resumed_run: str, step: str) -> None:
    """`mlflow run -P resume=ID` made a run of its own before the step reopened run ID: name that
    launcher run for what it is, a pointer, so nobody takes it for a failed or empty training."""
    client = MlflowClient()
    client.set_tag(launcher_run, "mlflow.runName", f"{step} resume -> {resumed_run[:8]}")
    client.set_tag(launcher_run, "pipeline.resumed_run", resumed_run)
    client.set_tag(launcher_run, "mlflow.note.content", f"Resumed run {resumed_run}; its metrics and model are there.")


def _forget_active_run() -> None:
    """Drop the active run from MLflow's stack without a call to the server; it stays RUNNING there,
    which `resume` accepts."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        stack.pop()


@contextlib.contextmanager
def ending_run(stopped: tuple[type[BaseException], ...] = ()):
    """End the active run as its block ends: FINISHED, KILLED (Ctrl-C, SIGTERM, `stopped`), or FAILED."""
    try:
        yield
    except TrackingLost:
        _forget_active_run()  # ending it would wait out MLflow's retries against the lost server again
        raise
    except (KeyboardInterrupt, *stopped):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


# --- naming the run a command was in (its Ctrl-C line) ---------------------------------------

def last_run_id() -> str | None:
    """The run this process had open most recently (MLflow keeps it per thread), or None."""
    active = mlflow.active_run()
    return active.info.run_id if active else mlflow.tracking.fluent._last_active_run_id.get()


def describe_interrupted_run(run_before: str | None) -> str:
    """The line a command prints on Ctrl-C: the run it opened since `run_before` (last_run_id() when it
    started) and how that run ended, or that there was none."""
    run_id = last_run_id()
    if run_id is None or run_id == run_before:
        return "interrupted before any run was created"
    try:
        run = mlflow.get_run(run_id)
    except Exception:  # the store may be what hung; the id is still worth printing
        return f"interrupted: run {run_id}"
    return f"interrupted: run {run_id} ({run.info.run_name}) was ended {run.info.status}"
