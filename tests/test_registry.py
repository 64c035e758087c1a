"""Registering models: version descriptions a reviewer can read, and alias `champion` on the best."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score

from pipeline.config import TrainConfig
from pipeline.data.store import load_dataset
from pipeline.errors import PipelineError
from pipeline.run.runners import run_train
from pipeline.track import registry

CPU = dict(device="cpu", precision="fp32")


def _test_split(trained):
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    return ds.splits["test"], ds.class_names


def test_finetune_register_as_scores_on_test_registers_and_crowns(trained, experiment, monkeypatch):
    cfg = TrainConfig(data=trained.prepare, pretrained=trained.pretrain, arch="auto", frozen_layers=4, epochs=1,
                      batch_size=64, lr=0.01, augment="none", register_as="digits-finetuned", **CPU)
    # As under `mlflow run`: the launcher's run already holds arch=auto, which cannot change.
    with mlflow.start_run() as launched:
        mlflow.log_param("arch", "auto")
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    run_id = run_train(cfg, "finetune")
    assert run_id == launched.info.run_id
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    # The test metrics in the run are those of the logged model's own predictions.
    test, class_names = _test_split(trained)
    pred = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(test.images)["class_name"].map(class_names.index)
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy_score(test.labels, pred))
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "evaluation")}
    assert "evaluation/test_confusion_matrix.png" in artifacts

    client = MlflowClient()
    (version,) = client.search_model_versions("name='digits-finetuned'")
    assert version.run_id == run_id
    text = version.description
    assert f"runs:/{trained.prepare}/dataset" in text  # the data
    assert f"runs:/{trained.pretrain}/model" in text  # the pretrained source
    assert f"accuracy {run.data.metrics['test_accuracy']:.4f}" in text and f"({len(test.labels)} images)" in text
    assert "frozen_layers=4" in text and text.startswith("**finetune resnet18**")  # arch=auto resolved
    assert float(version.tags["test_f1_macro"]) == pytest.approx(run.data.metrics["test_f1_macro"], rel=1e-5)
    assert client.get_model_version_by_alias("digits-finetuned", "champion").version == version.version


def test_champion_moves_only_to_a_better_version(trained):
    name = "digits-champion-rule"
    v1 = registry.register_run_model(trained.pretrain, name, "first", {"test_f1_macro": "0.80"})
    assert registry.champion_holds(name, "test_f1_macro", 0.80) is None  # no champion yet
    registry.promote(name, v1)
    v2 = registry.register_run_model(trained.finetune, name, "second", {"test_f1_macro": "0.70"})
    reason = registry.champion_holds(name, "test_f1_macro", 0.70)
    assert reason and "stays" in reason and f"version {v1}" in reason
    assert registry.champion_holds(name, "test_f1_macro", 0.85) is None
    assert registry.champion_holds(name, "val_loss", 0.1, higher_is_better=False) == (
        f"{name}@champion (version {v1}) has no val_loss to compare; left as is")
    # Registering the same run again updates its one version instead of adding another.
    again = registry.register_run_model(trained.finetune, name, "second, edited", {})
    client = MlflowClient()
    assert again == v2 and len(client.search_model_versions(f"name='{name}'")) == 2
    assert client.get_model_version(name, v2).description == "second, edited"
    assert client.get_model_version_by_alias(name, "champion").version == v1


def test_main_registers_the_evaluated_model_with_its_test_metrics(trained):
    version = registry.register_evaluated(trained.finetune, trained.evaluate, "digits-main", 180)
    mv = MlflowClient().get_model_version("digits-main", version)
    metrics = mlflow.get_run(trained.evaluate).data.metrics
    assert mv.run_id == trained.finetune
    assert f"f1_macro {metrics['test_f1_macro']:.4f}" in mv.description and "(180 images)" in mv.description
    with pytest.raises(PipelineError, match="has no test metrics"):
        registry.register_evaluated(trained.finetune, trained.prepare, "digits-main", 180)


def test_register_as_without_a_test_split_fails_before_training(trained, experiment):
    from pipeline.config import PrepareConfig
    from pipeline.run.runners import run_prepare

    no_test = run_prepare(PrepareConfig(source="digits", image_size=8, test_fraction=0.0, samples_per_class=10))
    cfg = TrainConfig(data=no_test, pretrained=trained.pretrain, arch="auto", epochs=1, batch_size=32, augment="none",
                      register_as="never-registered", **CPU)
    with pytest.raises(PipelineError, match="re-run prepare_data with test_fraction > 0"):
        run_train(cfg, "finetune")
    (run,) = [
        r
        for r in mlflow.search_runs([experiment], output_format="list")
        if r.data.tags.get("pipeline.step") == "finetune"
    ]
    assert run.info.status == "FAILED" and "train_loss" not in run.data.metrics  # stopped before the first epoch
    assert not MlflowClient().search_model_versions("name='never-registered'")
