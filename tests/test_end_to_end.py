"""End to end: the entry points through `mlflow run . --env-manager local`, and main's run reuse."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PrepareConfig, TrainConfig
from pipeline.run.chain import ChainConfig, run_chain
from tests.conftest import SHARED_ARCHIVE, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
TINY = ["-P", "batch_size=64", "-P", "augment=none", "-P", "precision=fp32", "-P", "device=cpu"]


def _mlflow_run(entry, experiment, *params, fails_with=""):
    bin_dir = str(Path(sys.executable).parent)
    env = subprocess_env()
    cmd = [
        os.path.join(bin_dir, "mlflow"),
        "run",
        str(ROOT),
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
        *params,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if fails_with:
        assert r.returncode != 0 and f"error: {fails_with}" in r.stderr, r.stderr[-3000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]
    exp = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time DESC"])
    return runs[0]


def test_four_entry_points_through_mlflow_run():
    exp = f"e2e-{os.urandom(3).hex()}"
    prep = _mlflow_run("prepare_data", exp, "-P", "source=digits", "-P", "image_size=8", "-P", "classes=0,1,2,3")
    pre = _mlflow_run("pretrain", exp, "-P", f"data={prep.info.run_id}", "-P", "epochs=2", *TINY)
    fin = _mlflow_run(
        "finetune",
        exp,
        "-P",
        f"data={prep.info.run_id}",
        "-P",
        f"pretrained=runs:/{pre.info.run_id}/model",
        "-P",
        "frozen_layers=2",
        "-P",
        "epochs=1",
        *TINY,
    )
    ev = _mlflow_run(
        "evaluate", exp, "-P", f"model={fin.info.run_id}", "-P", f"data={prep.info.run_id}", "-P", "device=cpu"
    )
    for run, step in ((prep, "prepare_data"), (pre, "pretrain"), (fin, "finetune"), (ev, "evaluate")):
        assert run.info.status == "FINISHED" and run.data.tags["pipeline.step"] == step
        assert run.data.tags["mlflow.project.entryPoint"] == step
    assert prep.data.metrics["num_classes"] == 4
    assert pre.data.tags["pipeline.upstream.data"] == f"runs:/{prep.info.run_id}/dataset"
    assert fin.data.tags["pipeline.upstream.pretrained_run"] == pre.info.run_id
    assert fin.data.params["frozen_layers"] == "2"
    assert ev.data.tags["pipeline.upstream.model_run"] == fin.info.run_id
    assert {"test_accuracy", "test_f1_macro", "test_precision_weighted", "test_f1_3"} <= set(ev.data.metrics)
    assert len(MlflowClient().get_metric_history(pre.info.run_id, "val_accuracy")) == 2
    # resume needs no other parameter (the run's stored config is used); a finished run is refused.
    for run, step in ((pre, "pretrain"), (fin, "finetune")):
        _mlflow_run(
            step,
            exp,
            "-P",
            f"resume={run.info.run_id}",
            fails_with=f"run {run.info.run_id} already FINISHED; nothing to resume",
        )
    _mlflow_run("finetune", exp, "-P", f"data={prep.info.run_id}", fails_with="finetune needs pretrained")


def _chain(**changes):
    shared = dict(batch_size=64, augment="none", precision="fp32", device="cpu")
    cfg = ChainConfig(
        prepare=PrepareConfig(source="digits", image_size=8, classes="0,1,2"),
        pretrain=TrainConfig(epochs=1, **shared),
        finetune=TrainConfig(epochs=1, lr=0.01, frozen_layers=3, pretrained="(from pretrain)", **shared),
    )
    return dataclasses.replace(cfg, **changes)


def test_main_reuses_finished_runs_and_recomputes_downstream_of_a_change(experiment):
    logs = []
    first = run_chain(_chain(), logs.append)
    assert not any("reusing" in line for line in logs)
    logs.clear()
    # Switching system metrics off changes what is recorded, not what is computed: all reused.
    quiet = _chain()
    quiet = dataclasses.replace(
        quiet,
        pretrain=dataclasses.replace(quiet.pretrain, system_metrics=False),
        finetune=dataclasses.replace(quiet.finetune, system_metrics=False),
    )
    second = run_chain(quiet, logs.append)
    assert second == first
    assert sum("reusing" in line for line in logs) == 4
    logs.clear()
    cfg = _chain()
    third = run_chain(
        dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, frozen_layers=1)), logs.append
    )
    assert third["prepare_data"] == first["prepare_data"] and third["pretrain"] == first["pretrain"]
    assert third["finetune"] != first["finetune"] and third["evaluate"] != first["evaluate"]
    # A different upstream (another split seed) changes every step after it.
    fourth = run_chain(dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, seed=1)), logs.append)
    assert all(fourth[s] != first[s] for s in first)
    parents = mlflow.search_runs([experiment], filter_string="tags.`pipeline.step` = 'main'", output_format="list")
    assert len(parents) == 4 and all(p.info.status == "FINISHED" for p in parents)
    children = mlflow.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parents[-1].info.run_id}'", output_format="list"
    )
    assert len(children) == 4
    # The parent's description (the UI's first view of a pipeline) says what was reused and how it scored.
    (third_parent,) = [p for p in parents if p.data.tags.get("pipeline.finetune_run") == third["finetune"]]
    note = third_parent.data.tags["mlflow.note.content"]
    accuracy = mlflow.get_run(third["evaluate"]).data.metrics["test_accuracy"]
    assert f"Test accuracy {accuracy:.4f}" in note and "first 1 of 5 stages frozen" in note
    assert f"prepare_data: reused `{first['prepare_data']}`" in note and f"finetune: ran `{third['finetune']}`" in note


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason=f"the shared CIFAR-10 JPEG archive is not at {SHARED_ARCHIVE}")
def test_real_jpeg_archive_prepare_pretrain_evaluate(experiment):
    from pipeline.config import EvaluateConfig
    from pipeline.run.evaluation_run import run_evaluate
    from pipeline.run.runners import run_prepare, run_train

    prep = run_prepare(
        PrepareConfig(
            source=str(SHARED_ARCHIVE),
            image_size=16,
            classes="cat,ship,truck",
            samples_per_class=300,
            val_fraction=0.02,
            test_fraction=0.02,
        )
    )
    run = mlflow.get_run(prep)
    assert run.data.metrics["train_images"] == 900 and run.data.metrics["skipped_files"] == 0
    assert run.data.metrics["test_images"] == 300  # 2% of 15,000
    assert run.data.metrics["val_images"] == 294  # 2% of the 14,700 non-test images
    pre = run_train(TrainConfig(data=prep, epochs=2, batch_size=64, lr=0.05, device="cpu"), "pretrain")
    assert mlflow.get_run(pre).data.metrics["best_val_accuracy"] > 0.4  # 3 classes: chance is 1/3
    ev = run_evaluate(EvaluateConfig(model=pre, data=prep, device="cpu"))
    assert mlflow.get_run(ev).data.metrics["test_accuracy"] > 0.4
