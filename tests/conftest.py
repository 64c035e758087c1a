"""Shared fixtures: every test session tracks into its own temporary MLflow store.

The session fixture `trained` runs the four steps once, in-process, on scikit-learn's digits at
8x8 pixels (fast on 2 CPU cores); many tests read what those runs logged.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_ARCHIVE = PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"

_session_dir = tempfile.mkdtemp(prefix="pipeline-tests-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_session_dir}/mlflow.db"
os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
os.environ.pop("MLFLOW_RUN_ID", None)
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


# What fit() reports after every epoch (the on_epoch callback, and each training run's per-epoch metrics).
EPOCH_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_precision_macro", "val_recall_macro",
                 "val_f1_macro", "lr", "images_per_sec"}


def subprocess_env(**extra: str) -> dict:
    """The environment for a step, `mlflow` or `torchrun` subprocess: this session's tracking store,
    the venv's bin first on PATH (as when activated: `mlflow run` and `mlflow models serve` run
    `python`/`uvicorn` by name), no PIPELINE_DEBUG, and without the experiment and run ids that
    mlflow.set_experiment()/start_run() export (they name nothing in another store, and `mlflow run`
    refuses --experiment-name beside MLFLOW_EXPERIMENT_ID). `extra` overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    }
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return {**env, "PIPELINE_DEBUG": "", **extra}


@pytest.fixture
def experiment(request) -> str:
    """A fresh experiment per test, so run searches see only that test's runs."""
    name = f"{request.node.name}-{os.urandom(4).hex()}"
    exp_id = mlflow.create_experiment(name)
    mlflow.set_experiment(experiment_id=exp_id)
    yield exp_id
    while mlflow.active_run():
        mlflow.end_run("FAILED")


def write_image(path: Path, color, size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*size[::-1], 3), np.uint8)
    arr[...] = color
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three colour classes, 6 images each, of varying sizes, in ImageFolder layout."""
    root = tmp_path / "shapes"
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    for cls, color in colors.items():
        for i in range(6):
            write_image(root / cls / f"{i}.png", color, size=(12 + i, 10 + i))
    return root


@dataclass
class TrainedRuns:
    experiment_id: str
    prepare: str
    pretrain: str
    finetune: str
    evaluate: str


@pytest.fixture(scope="session")
def trained() -> TrainedRuns:
    from pipeline.config import EvaluateConfig, PrepareConfig, TrainConfig
    from pipeline.run.evaluation_run import run_evaluate
    from pipeline.run.runners import run_prepare, run_train

    exp_id = mlflow.create_experiment("trained-fixture")
    mlflow.set_experiment(experiment_id=exp_id)
    prep = run_prepare(PrepareConfig(source="digits", image_size=8, seed=0))
    tiny = dict(data=prep, batch_size=64, augment="none", precision="fp32", device="cpu")
    pre = run_train(TrainConfig(epochs=2, lr=0.05, **tiny), "pretrain")
    fin = run_train(TrainConfig(epochs=1, lr=0.01, pretrained=pre, frozen_layers=3, arch="auto", **tiny), "finetune")
    ev = run_evaluate(EvaluateConfig(model=fin, data=prep, device="cpu", precision="fp32"))
    return TrainedRuns(exp_id, prep, pre, fin, ev)


def _use_store(uri: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """For tuning: local copies of a 10-class digits dataset (8x8 px) and of a model pretrained on 5
    classes, so every trial trains a fresh head. Local folders work in any MLflow store."""
    from pipeline.config import PrepareConfig, TrainConfig
    from pipeline.run.runners import run_prepare, run_train

    root = tmp_path_factory.mktemp("tune-inputs")
    prev = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        _use_store(f"sqlite:///{root}/mlflow.db", mp)
        try:
            five = run_prepare(PrepareConfig(source="digits", image_size=8, classes="0,1,2,3,4", samples_per_class=40))
            ten = run_prepare(PrepareConfig(source="digits", image_size=8, samples_per_class=30))
            pre = run_train(
                TrainConfig(
                    data=five, epochs=2, lr=0.05, batch_size=64, augment="none", precision="fp32", device="cpu"
                ),
                "pretrain",
            )
            data = mlflow.artifacts.download_artifacts(f"runs:/{ten}/dataset", dst_path=str(root / "data"))
            model = mlflow.artifacts.download_artifacts(f"runs:/{pre}/model", dst_path=str(root / "pretrained"))
        finally:
            mlflow.set_tracking_uri(prev)
    return {"data": data, "pretrained": model}


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store (and registry) for one test."""
    prev = mlflow.get_tracking_uri()
    _use_store(f"sqlite:///{tmp_path}/mlflow.db", monkeypatch)
    yield str(tmp_path)
    while mlflow.active_run():
        mlflow.end_run("FAILED")
    mlflow.set_tracking_uri(prev)
