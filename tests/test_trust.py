"""Comparisons you can trust, end to end on tiny digits: per-image predictions, bootstrap intervals,
paired tests in compare, calibration (temperature scaling) and the study's best-vs-runner-up line.

Two models on the same data (lr 0.05 calibrated, lr 0.2 with calibrate=false), each evaluated on
the test split, and the first also on the val split (other images: cannot be paired).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from scipy.stats import binomtest

from pipeline.config import CompareConfig, EvaluateConfig, PrepareConfig, TrainConfig, TuneConfig
from pipeline.evaluate.calibration import negative_log_likelihood
from pipeline.evaluate.keys import class_keys
from pipeline.evaluate.predictions import read_predictions
from pipeline.model.models import ImageClassifier, build_logged_net
from pipeline.run.compare import _per_class_f1, compare
from pipeline.run.evaluation_run import run_evaluate
from pipeline.run.runners import run_prepare, run_train
from pipeline.study.summary import best_vs_runner_up
from pipeline.study.tracking import ATTR_RUN_ID
from pipeline.track.references import load_dataset_ref, load_model_ref


@dataclass
class Runs:
    prepare: str
    calibrated: str
    plain: str
    eval_calibrated: str
    eval_plain: str
    eval_val: str


@pytest.fixture(scope="module")
def runs() -> Runs:
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(f"trust-{np.random.randint(1 << 30)}"))
    prep = run_prepare(PrepareConfig(source="digits", image_size=8, classes="0,1,2", samples_per_class=40))
    tiny = dict(data=prep, epochs=1, batch_size=32, augment="none", precision="fp32", device="cpu",
                system_metrics=False)
    calibrated = run_train(TrainConfig(lr=0.05, **tiny), "pretrain")
    plain = run_train(TrainConfig(lr=0.2, calibrate=False, **tiny), "pretrain")
    evaluate = dict(data=prep, device="cpu", precision="fp32")
    return Runs(prep, calibrated, plain, run_evaluate(EvaluateConfig(model=calibrated, **evaluate)),
                run_evaluate(EvaluateConfig(model=plain, **evaluate)),
                run_evaluate(EvaluateConfig(model=calibrated, split="val", **evaluate)))


def _predictions(run_id: str, split: str = "test") -> pd.DataFrame:
    return read_predictions(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                artifact_path=f"evaluation/{split}_predictions.csv"))


def _logits_and_meta(model_run: str, images: np.ndarray) -> tuple[np.ndarray, dict]:
    state, meta = load_model_ref(model_run)
    net = ImageClassifier(build_logged_net(meta, state), meta["class_names"], meta["image_size"]).eval()
    with torch.no_grad():
        return net(torch.from_numpy(images)).double().numpy(), meta


def _test_split(runs: Runs):
    ds, _, _ = load_dataset_ref(runs.prepare, ("test",))
    return ds.splits["test"], ds.class_names


def test_predictions_csv_round_trips_and_matches_the_served_model(runs):
    test, class_names = _test_split(runs)
    table = _predictions(runs.eval_calibrated)
    assert list(table.columns[:4]) == ["index", "image", "true_class", "predicted_class"]
    assert table["true_class"].tolist() == [class_names[i] for i in test.labels]
    served = mlflow.pyfunc.load_model(f"runs:/{runs.calibrated}/model").predict(test.images)
    probs = [f"prob_{c}" for c in class_names]
    np.testing.assert_allclose(table[probs].to_numpy(), served[probs].to_numpy(), atol=1e-5)
    assert table["predicted_class"].tolist() == served["class_name"].tolist()
    tags = mlflow.get_run(runs.eval_calibrated).data.tags
    manifest_digest = mlflow.get_run(runs.prepare).data.tags["pipeline.dataset_digest"]
    assert tags["pipeline.scored_digest.test"] == manifest_digest


def test_intervals_bracket_the_point_estimates_and_ece_matches_a_direct_count(runs):
    metrics = mlflow.get_run(runs.eval_calibrated).data.metrics
    keys = class_keys(["0", "1", "2"], reserved=("macro", "weighted"))
    for name in ["test_accuracy", "test_f1_macro", *(f"test_f1_{keys[c]}" for c in "012")]:
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert metrics["test_accuracy_ci_high"] - metrics["test_accuracy_ci_low"] > 0.01  # ~50 images: not a point
    table = _predictions(runs.eval_calibrated)
    probs = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    confidence, right = probs.max(1), table["predicted_class"] == table["true_class"]
    ece = 0.0
    for low in np.arange(15) / 15:  # bins (low, low + 1/15], the first one closed at 0
        inside = (confidence > low) & (confidence <= low + 1 / 15) | ((low == 0) & (confidence == 0))
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - confidence[inside].mean())
    assert metrics["test_ece"] == pytest.approx(ece, abs=1e-6)
    assert "evaluation/test_reliability.png" in {f.path for f in mlflow.MlflowClient().list_artifacts(
        runs.eval_calibrated, "evaluation")}


def test_compare_tests_rows_on_the_same_images_and_marks_other_data_unpaired(runs):
    table, metric = compare(CompareConfig(runs=" ".join([runs.calibrated, runs.plain, runs.eval_calibrated,
                                                          runs.eval_plain, runs.eval_val])))
    by_eval = table.set_index("evaluate_run_id")
    a, b = _predictions(runs.eval_calibrated), _predictions(runs.eval_plain)
    right_a, right_b = a.predicted_class == a.true_class, b.predicted_class == b.true_class
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    top, other = (runs.eval_calibrated, runs.eval_plain) if table.evaluate_run_id[0] == runs.eval_calibrated \
        else (runs.eval_plain, runs.eval_calibrated)
    assert by_eval.loc[top, "vs_best"] == "best" and by_eval.loc[top, "p_mcnemar"] == 1.0
    assert by_eval.loc[other, "p_mcnemar"] == pytest.approx(expected)
    assert by_eval.loc[other, "vs_best"] in ("tie", "differs")
    assert 0 < by_eval.loc[other, "p_f1_macro"] <= 1
    assert by_eval.loc[runs.eval_val, "vs_best"] == "unpaired"
    assert np.isnan(by_eval.loc[runs.eval_val, "p_mcnemar"])
    assert {"test_accuracy_ci_low", "test_f1_macro_ci_high"} <= set(table.columns)
    assert not [c for c in table.columns if c.startswith("test_f1_") and c.endswith("_ci_low")
                and c != "test_f1_macro_ci_low"]  # per-class intervals stay in MLflow, out of the table
    split, _, classes = _per_class_f1(table)
    assert (split, classes) == ("test", ["0", "1", "2"])  # no `macro_ci_low` class


def test_temperature_is_stored_and_applied_by_the_served_model(runs):
    test, _ = _test_split(runs)
    logits, meta = _logits_and_meta(runs.calibrated, test.images)
    temperature = meta["temperature"]
    assert isinstance(temperature, float) and temperature > 0
    logged = mlflow.get_run(runs.calibrated).data.metrics
    assert logged["temperature"] == pytest.approx(temperature)
    assert 0 <= logged["val_ece"] <= 1 and 0 <= logged["val_ece_uncalibrated"] <= 1
    # What the temperature minimises on val is the NLL (after one epoch on 3 classes ECE can go either way).
    val = load_dataset_ref(runs.prepare, ("val",))[0].splits["val"]
    val_logits, _ = _logits_and_meta(runs.calibrated, val.images)
    assert negative_log_likelihood(val_logits, val.labels, temperature) <= negative_log_likelihood(val_logits,
                                                                                                   val.labels)
    print(f"\nval ECE uncalibrated {logged['val_ece_uncalibrated']:.4f} -> calibrated {logged['val_ece']:.4f} "
          f"(T={temperature:.3f})")
    served = mlflow.pyfunc.load_model(f"runs:/{runs.calibrated}/model").predict(test.images)
    probs = served[[c for c in served.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs, softmax(logits / temperature, axis=1), atol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()
    np.testing.assert_allclose(served["confidence"], probs.max(1))


def test_calibrate_false_stores_no_temperature_and_serves_the_plain_softmax(runs):
    test, _ = _test_split(runs)
    logits, meta = _logits_and_meta(runs.plain, test.images)
    assert meta["temperature"] is None
    logged = mlflow.get_run(runs.plain).data.metrics
    assert "temperature" not in logged and logged["val_ece"] == logged["val_ece_uncalibrated"]
    served = mlflow.pyfunc.load_model(f"runs:/{runs.plain}/model").predict(test.images)
    probs = served[[c for c in served.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs, softmax(logits, axis=1), atol=1e-5)


def test_study_summary_says_whether_the_best_trial_beats_the_runner_up(runs):
    study = optuna.create_study(direction="maximize")
    for value, run_id in ((0.9, runs.calibrated), (0.8, runs.plain)):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={ATTR_RUN_ID: run_id}))
    text = best_vs_runner_up(study, TuneConfig(data=runs.prepare, pretrained=runs.calibrated))
    a, b = _predictions(runs.calibrated, "val"), _predictions(runs.plain, "val")
    right_a, right_b = a.predicted_class == a.true_class, b.predicted_class == b.true_class
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert f"({len(a)} images)" in text and "runner-up, trial 1" in text
    assert f"McNemar p={expected:.3g}" in text
    assert ("cannot be told apart" in text) or ("differs from" in text)
