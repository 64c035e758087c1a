"""SIGTERM ends a training run KILLED with its last epoch checkpointed; `resume` finishes it
with the same metrics as an uninterrupted run (CPU, fixed seed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PrepareConfig
from pipeline.run.runners import run_prepare

ROOT = Path(__file__).resolve().parent.parent

ARGS = ["--epochs", "4", "--batch-size", "32", "--device", "cpu", "--precision", "fp32", "--lr", "0.02"]


def _pretrain(env, *args, **popen):
    return subprocess.Popen([sys.executable, "-m", "steps.pretrain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _history(run_id):
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, "val_loss")}


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(experiment):
    data = run_prepare(PrepareConfig(source="digits", image_size=8, classes="0,1,2,3"))
    env = {**os.environ, "MLFLOW_EXPERIMENT_ID": experiment}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)

    full = _pretrain(env, "--data", data, *ARGS)
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-2000:]
    full_id = out.strip().split()[-1]

    victim = _pretrain(env, "--data", data, *ARGS)
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline:
        runs = [
            r
            for r in mlflow.search_runs([experiment], output_format="list")
            if r.info.run_id != full_id and r.data.tags.get("pipeline.step") == "pretrain"
        ]
        if runs and len(_history(runs[0].info.run_id)) >= 2:
            run_id = runs[0].info.run_id
            break
        time.sleep(0.2)
    assert run_id, "the run never reached epoch 2"
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130 and "interrupted" in err
    assert mlflow.get_run(run_id).info.status == "KILLED"
    assert "checkpoints/last.pt" in {a.path for a in MlflowClient().list_artifacts(run_id, "checkpoints")}

    resumed = _pretrain(env, "--resume", run_id)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert _history(run_id) == pytest.approx(_history(full_id))
    assert sorted(_history(run_id)) == [1, 2, 3, 4]


def test_resume_of_a_finished_run_is_refused(experiment):
    from pipeline.errors import PipelineError
    from pipeline.track import run_checkpoints

    with mlflow.start_run(tags={"pipeline.step": "pretrain"}) as run:
        pass
    with pytest.raises(PipelineError, match="already FINISHED; nothing to resume"):
        run_checkpoints.load_resume_point(run.info.run_id, "pretrain")


def test_resume_under_mlflow_run_names_the_launchers_run_a_pointer(experiment, monkeypatch):
    """`mlflow run -P resume=ID` creates a run before the step reopens run ID: that run is labelled."""
    from pipeline.track import tracking

    client = MlflowClient()
    interrupted = client.create_run(experiment, tags={"pipeline.step": "pretrain"}).info.run_id
    client.set_terminated(interrupted, "KILLED")
    launcher = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    with tracking.step_run("pretrain", "pretrain resnet18", run_id=interrupted) as run:
        assert run.info.run_id == interrupted
    tags = client.get_run(launcher).data.tags
    assert tags["pipeline.resumed_run"] == interrupted
    assert tags["mlflow.runName"] == f"pretrain resume -> {interrupted[:8]}"
    assert client.get_run(interrupted).info.status == "FINISHED"
