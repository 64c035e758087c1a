"""What the four step runs leave in MLflow (the session fixture `trained` made them)."""

import os
import tarfile

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.data.store import load_dataset
from pipeline.errors import PipelineError
from pipeline.run import evaluation_run
from pipeline.run.evaluation_run import run_evaluate
from pipeline.run.runners import TrialHooks, run_train
from pipeline.track import references, run_checkpoints
from pipeline.track.run_checkpoints import CHECKPOINT_DIR, LAST_CHECKPOINT, CheckpointUploads
from tests.conftest import EPOCH_METRICS

TRAIN_PARAMS = {
    "data",
    "arch",
    "weights",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "label_smoothing",
    "precision",
    "device",
    "seed",
}


def _artifacts(run_id, path=""):
    return {a.path for a in MlflowClient().list_artifacts(run_id, path)}


def test_prepare_data_logs_a_verified_dataset_and_an_input(trained):
    run = mlflow.get_run(trained.prepare)
    assert run.info.status == "FINISHED"
    assert run.data.params["source"] == "digits" and run.data.params["image_size"] == "8"
    path = mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset")
    ds, manifest = load_dataset(path)
    assert ds.class_names == [str(i) for i in range(10)]
    assert sum(len(s) for s in ds.splits.values()) == 1797
    assert run.data.metrics["test_images"] == len(ds.splits["test"])
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == manifest["digest"]


def test_pretrain_logs_contract_params_epoch_metrics_config_and_model(trained):
    run = mlflow.get_run(trained.pretrain)
    assert run.info.status == "FINISHED"
    assert TRAIN_PARAMS <= set(run.data.params)
    assert EPOCH_METRICS <= set(run.data.metrics)
    history = MlflowClient().get_metric_history(trained.pretrain, "val_f1_macro")
    assert [m.step for m in history] == [1, 2]
    assert "config.yaml" in _artifacts(trained.pretrain)
    assert run.data.tags["pipeline.stopped_early"] == "false"  # patience=0 ran all epochs (history above)
    assert run.data.tags["pipeline.upstream.data"] == f"runs:/{trained.prepare}/dataset"
    assert run.inputs.dataset_inputs[0].tags[0].value == "training"
    # The logged model takes what a user has: uint8 (N, H, W, 3) images, of any size.
    model = mlflow.pyfunc.load_model(f"runs:/{trained.pretrain}/model")
    out = model.predict(np.zeros((3, 20, 14, 3), np.uint8))
    assert list(out.columns) == ["class_name", "confidence", *[f"prob_{d}" for d in "0123456789"]]
    assert len(out) == 3 and np.allclose(out.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)


def test_finetune_consumes_pretrain_and_keeps_frozen_stages(trained):
    run = mlflow.get_run(trained.finetune)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.upstream.pretrained_run"] == trained.pretrain
    # The UI's description says where it came from and how it did.
    note = run.data.tags["mlflow.note.content"]
    assert f"runs:/{trained.pretrain}/model" in note and "first 3 of 5 stages frozen" in note
    assert f"val macro-F1 {run.data.metrics['best_val_f1_macro']:.4f}" in note
    assert run.data.params["frozen_layers"] == "3" and run.data.params["arch"] == "resnet18"
    pre_params = int(mlflow.get_run(trained.pretrain).data.params["trainable_params"])
    assert 0 < int(run.data.params["trainable_params"]) < pre_params
    pre_state, _ = references.load_model_ref(trained.pretrain)
    fin_state, _ = references.load_model_ref(trained.finetune)
    for k in pre_state:
        frozen = k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}
        assert torch.equal(pre_state[k], fin_state[k]) == frozen or k.endswith("num_batches_tracked"), k


def test_evaluate_metrics_equal_sklearn_on_independent_predictions(trained):
    run = mlflow.get_run(trained.evaluate)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"evaluate test: {mlflow.get_run(trained.finetune).info.run_name}"
    assert f"accuracy {run.data.metrics['test_accuracy']:.4f}" in run.data.tags["mlflow.note.content"]
    m = run.data.metrics
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    test = ds.splits["test"]
    model = mlflow.pyfunc.load_model(f"runs:/{trained.finetune}/model")
    pred = model.predict(test.images)["class_name"].map(ds.class_names.index).to_numpy()
    assert m["test_accuracy"] == pytest.approx(accuracy_score(test.labels, pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(test.labels, pred, average=avg, zero_division=0)
        assert (m[f"test_precision_{avg}"], m[f"test_recall_{avg}"], m[f"test_f1_{avg}"]) == pytest.approx((p, r, f))
    p, r, f, _ = precision_recall_fscore_support(test.labels, pred, labels=list(range(10)), zero_division=0)
    assert [m[f"test_f1_{c}"] for c in range(10)] == pytest.approx(list(f))
    arts = _artifacts(trained.evaluate, "evaluation")
    assert {
        f"evaluation/test_{n}"
        for n in ("per_class.csv", "classification_report.txt", "confusion_matrix.png", "confusion_matrix.csv")
    } <= arts


def test_evaluate_scores_a_users_image_folder(trained, tmp_path, experiment):
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    test = ds.splits["test"]
    for i in range(40):
        folder = tmp_path / "mine" / str(test.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i]).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    run_id = run_evaluate(
        EvaluateConfig(model=trained.finetune, data=str(tmp_path / "mine"), device="cpu", precision="fp32")
    )
    m = mlflow.get_run(run_id).data.metrics
    # The 40 images (PNG is lossless, and already at the model's size) scored as the model scores them.
    pred = mlflow.pyfunc.load_model(f"runs:/{trained.finetune}/model").predict(test.images[:40])["class_name"]
    assert m["test_accuracy"] == pytest.approx(accuracy_score([str(c) for c in test.labels[:40]], pred))
    assert m["skipped_files"] == 1
    skipped = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/skipped_files.txt")
    assert skipped == f"{folder.name}/notes.txt: not an image format PIL can read\n"  # file and reason


def _write_pngs(root, images, labels, class_names):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")


def _model_accuracy(model_run, images, labels, class_names):
    pred = mlflow.pyfunc.load_model(f"runs:/{model_run}/model").predict(images)["class_name"]
    return accuracy_score([class_names[c] for c in labels], pred)


def test_evaluate_scores_an_archive_holding_only_a_test_split(trained, tmp_path, experiment):
    # The layout of the public CIFAR-10 image dumps: <wrapper>/test/<class>/<img>, no train/.
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    test, names = ds.splits["test"], ds.class_names
    _write_pngs(tmp_path / "dump" / "test", test.images[:30], test.labels[:30], names)
    archive = tmp_path / "held-out.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "dump", arcname="cifar-like")
    run_id = run_evaluate(EvaluateConfig(model=trained.finetune, data=str(archive), device="cpu", precision="fp32"))
    m = mlflow.get_run(run_id).data.metrics
    assert m["test_accuracy"] == pytest.approx(
        _model_accuracy(trained.finetune, test.images[:30], test.labels[:30], names)
    )
    assert m["skipped_files"] == 0


def test_evaluate_scores_the_test_split_of_a_tree_with_train_and_test(trained, tmp_path, experiment):
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    test, names = ds.splits["test"], ds.class_names
    _write_pngs(tmp_path / "tree" / "test", test.images[:30], test.labels[:30], names)
    for name in names:  # a train/ beside it whose files are never decoded (on_bad_image=fail would say so)
        (tmp_path / "tree" / "train" / name).mkdir(parents=True)
        (tmp_path / "tree" / "train" / name / "broken.png").write_bytes(b"\x89PNG not really")
    run_id = run_evaluate(EvaluateConfig(model=trained.finetune, data=str(tmp_path / "tree"), device="cpu",
                                         precision="fp32", on_bad_image="fail"))
    m = mlflow.get_run(run_id).data.metrics
    assert m["test_accuracy"] == pytest.approx(
        _model_accuracy(trained.finetune, test.images[:30], test.labels[:30], names)
    )
    assert m["skipped_files"] == 0


def test_evaluate_names_the_splits_a_tree_has_when_the_one_asked_is_missing(trained, tmp_path, experiment, monkeypatch):
    for split in ("train", "val"):
        (tmp_path / "tree" / split / "3").mkdir(parents=True)
        (tmp_path / "tree" / split / "3" / "a.png").write_bytes(b"not decoded: refused before")
    decoded = []
    monkeypatch.setattr(evaluation_run, "decode_tree", lambda *a, **k: decoded.append(a))
    with pytest.raises(PipelineError, match=r"has no test/ split; it has train/, val/: set split to one of train, val"):
        run_evaluate(EvaluateConfig(model=trained.finetune, data=str(tmp_path / "tree"), device="cpu"))
    assert decoded == []
    for split in ("train", "val"):
        (tmp_path / "tree" / split / "cat").mkdir()
        (tmp_path / "tree" / split / "cat" / "b.png").write_bytes(b"")
    with pytest.raises(PipelineError, match="class folders the model does not know: cat"):
        run_evaluate(EvaluateConfig(model=trained.finetune, data=str(tmp_path / "tree"), split="val", device="cpu"))
    assert decoded == []


def _last_run_status(experiment_id):
    return mlflow.search_runs([experiment_id], output_format="list", order_by=["attributes.start_time DESC"])[
        0
    ].info.status


def test_unknown_run_id_fails_the_run_with_a_clear_message(experiment):
    with pytest.raises(PipelineError, match="no MLflow run '0123456789abcdef0123456789abcdef'"):
        run_train(TrainConfig(data="0123456789abcdef0123456789abcdef", device="cpu"), "pretrain")
    assert _last_run_status(experiment) == "FAILED"


def test_dataset_where_a_model_is_expected(trained, experiment):
    with pytest.raises(
        PipelineError,
        match=f"run {trained.prepare} is a prepare_data run \\(a dataset\\), not a model; "
        "pass a pretrain, finetune or prune run id",
    ):
        run_evaluate(EvaluateConfig(model=trained.prepare, data=trained.prepare, device="cpu"))
    assert _last_run_status(experiment) == "FAILED"
    # The reverse mistake, and a run that points at the one meant.
    with pytest.raises(
        PipelineError,
        match=f"is a finetune run \\(a model\\), not a dataset; pass a prepare_data run id "
        f"\\(dataset of this finetune run: runs:/{trained.prepare}/dataset\\)",
    ):
        run_train(TrainConfig(data=trained.finetune, epochs=1, device="cpu"), "pretrain")
    assert _last_run_status(experiment) == "FAILED"
    with pytest.raises(
        PipelineError,
        match=f"is an evaluate run \\(test results\\), not a model; .*model of this evaluate run: {trained.finetune}",
    ):
        references.model_uri(trained.evaluate)
    with pytest.raises(PipelineError, match="is a dataset"):
        references.load_model_ref(f"runs:/{trained.prepare}/dataset")


def test_pretrained_architecture_must_fit(trained, experiment):
    with pytest.raises(PipelineError, match="is a resnet18, not arch=resnet50; set arch=resnet18"):
        run_train(
            TrainConfig(data=trained.prepare, pretrained=trained.pretrain, arch="resnet50", device="cpu"), "finetune"
        )
    assert _last_run_status(experiment) == "FAILED"


def test_early_stopping_is_tagged_on_the_run(trained, experiment):
    # lr 1e-6 on the head only: val accuracy cannot improve after epoch 1, so patience=1 stops at epoch 2 of 4.
    cfg = TrainConfig(
        data=trained.prepare,
        pretrained=trained.pretrain,
        arch="auto",
        frozen_layers=5,
        epochs=4,
        lr=1e-6,
        schedule="constant",
        patience=1,
        monitor="val_accuracy",
        batch_size=256,
        augment="none",
        precision="fp32",
        device="cpu",
        system_metrics=False,
    )
    run_id = run_train(cfg, "finetune")
    epochs_run = len(MlflowClient().get_metric_history(run_id, "val_accuracy"))
    assert epochs_run < 4
    assert mlflow.get_run(run_id).data.tags["pipeline.stopped_early"] == "true"


def test_checkpoint_uploads_throttle_and_always_upload_on_interrupt(experiment, tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"epoch")
    with mlflow.start_run() as run:
        CheckpointUploads(str(ckpt), enabled=False, every=0).after_epoch()
        CheckpointUploads(str(ckpt), enabled=False).on_interrupt()
        assert _artifacts(run.info.run_id, CHECKPOINT_DIR) == set()  # trials without heartbeats keep it local
        uploads = CheckpointUploads(str(ckpt), every=3600)
        uploads.after_epoch()  # within the interval: not yet
        assert _artifacts(run.info.run_id, CHECKPOINT_DIR) == set()
        uploads.on_interrupt()  # Ctrl-C: the last finished epoch goes up regardless
        assert _artifacts(run.info.run_id, CHECKPOINT_DIR) == {f"{CHECKPOINT_DIR}/last.pt"}


def test_checkpoint_uploads_only_what_fit_wrote_since(experiment, tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr(run_checkpoints, "log_checkpoint", sent.append)
    ckpt = tmp_path / "last.pt"
    uploads = CheckpointUploads(str(ckpt), every=0)
    uploads.after_epoch()  # fit() writes by time: no file yet, nothing to send
    ckpt.write_bytes(b"epoch 1")
    uploads.after_epoch()
    uploads.after_epoch()  # the same file: not sent again
    os.utime(ckpt, (1, 1))  # rewritten
    uploads.after_epoch()
    assert sent == [str(ckpt), str(ckpt)]


def _tiny_pretrain(trained, **kw):
    return TrainConfig(data=trained.prepare, arch="resnet9", batch_size=256, augment="none", precision="fp32",
                       device="cpu", system_metrics=False, **kw)


def test_a_finished_run_deletes_its_checkpoint_unless_kept(trained, experiment, monkeypatch):
    uploaded = []
    upload = run_checkpoints.log_checkpoint
    monkeypatch.setattr(run_checkpoints, "log_checkpoint", lambda path: (uploaded.append(path), upload(path)))
    every_epoch = TrialHooks(upload_every=0)  # the checkpoint is up before the run ends
    deleted = run_train(_tiny_pretrain(trained, epochs=1), "pretrain", hooks=every_epoch)
    assert len(uploaded) == 1
    assert "config.yaml" in _artifacts(deleted) and CHECKPOINT_DIR not in _artifacts(deleted)  # gone, the rest kept
    kept = run_train(_tiny_pretrain(trained, epochs=1, keep_checkpoint=True), "pretrain")  # under a minute
    assert _artifacts(kept, CHECKPOINT_DIR) == {f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"}


def test_an_interrupted_run_keeps_its_checkpoint_for_resume(trained, experiment):
    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(_tiny_pretrain(trained, epochs=2), "pretrain", hooks=TrialHooks(on_epoch=interrupt))
    run = mlflow.search_runs([experiment], output_format="list", order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "KILLED"
    assert _artifacts(run.info.run_id, CHECKPOINT_DIR) == {f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"}
