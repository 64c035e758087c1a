"""An evaluation report (pipeline.evaluate.scoring) logged to the active MLflow run: metrics, tables and plots;
and the temperature calibration a training run fits on its validation split; reading a run's logged
class keys and per-image predictions back."""

from __future__ import annotations

import csv
import io
import tempfile

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from pipeline.evaluate.calibration import (
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    reliability_figure,
)
from pipeline.evaluate.plots import misclassified_grid, plot_confusion, precision_recall_figure
from pipeline.evaluate.predictions import (
    PREDICTIONS_PATH,
    TAG_DIGEST,
    array_digest,
    predictions_table,
    read_predictions,
    scored_images,
)
from pipeline.evaluate.scoring import MAX_PER_CLASS_METRICS, metric_keys
from pipeline.evaluate.stats import ScoredImages, bootstrap_intervals, interval_metrics
from pipeline.model.device import predict_logits
from pipeline.track.tracking import log_metrics

CLASS_KEYS_ARTIFACT = "evaluation/class_keys.json"  # {metric key part: class name}


def confusion_csv(confusion: np.ndarray, class_names: list[str]) -> str:
    """The confusion matrix as CSV: one row per true class, one column per predicted class (names
    with commas or quotes are quoted, as the csv module and pandas read them back)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true/predicted", *class_names])
    writer.writerows([name, *(int(v) for v in confusion[i])] for i, name in enumerate(class_names))
    return out.getvalue()


def load_class_keys(run_id: str) -> dict[str, str]:
    """{key: class name} that a run's per-class metric names use; {} for a run that logged none
    (older runs, runs without an evaluation), where every key is its class name."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CLASS_KEYS_ARTIFACT}")
    except (MlflowException, OSError, ValueError):
        return {}


def log_evaluation(report, class_names: list[str], split: str, images: np.ndarray | None = None, *,
                   digest: str = "") -> dict[str, float]:
    """Metrics, the per-class CSV table, the text report, the confusion matrix (PNG + CSV), per-class
    precision-recall curves (PNG) and, given the images, the most confidently misclassified (PNG);
    then log_trust: per-image predictions, bootstrap intervals, calibration. Returns log_trust's metrics.
    `digest`: the dataset manifest's digest, else one of the images and labels is taken."""
    log_metrics(report.metrics)
    mlflow.log_dict({key: name for name, key in metric_keys(class_names).items()}, CLASS_KEYS_ARTIFACT)
    trust = log_trust(report, class_names, split, digest or array_digest(images, report.labels))
    mlflow.log_text(report.per_class.to_csv(index=False), f"evaluation/{split}_per_class.csv")
    mlflow.log_text(report.report, f"evaluation/{split}_classification_report.txt")
    mlflow.log_text(confusion_csv(report.confusion, class_names), f"evaluation/{split}_confusion_matrix.csv")
    figures = {
        "confusion_matrix": plot_confusion(report.confusion, class_names),
        "precision_recall": precision_recall_figure(report.labels, report.probabilities, class_names,
                                                    report.average_precision),
    }
    if images is not None:
        figures["misclassified"] = misclassified_grid(images, report.labels, report.probabilities, class_names)
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        mlflow.log_figure(fig, f"evaluation/{split}_{name}.png")
        plt.close(fig)
    return trust


def log_predictions(labels: np.ndarray, probs: np.ndarray, class_names: list[str], split: str, digest: str,
                    image_names=None) -> None:
    """`evaluation/<split>_predictions.csv` and the tag saying which images they are on (the dataset
    digest), so runs scored on the same split can be compared image by image."""
    table = predictions_table(labels, probs, class_names, image_names)
    mlflow.log_text(table.to_csv(index=False), PREDICTIONS_PATH.format(split=split))
    mlflow.set_tag(TAG_DIGEST.format(split=split), digest)


def interval_metrics_of(report, class_names: list[str], split: str) -> dict[str, float]:
    """95% bootstrap intervals (seeded, 1000 resamples) of accuracy, macro-F1 and, for as many classes
    as get per-class metrics, each class's F1: `<split>_accuracy_ci_low` ..."""
    pred = report.probabilities.argmax(1)
    intervals = bootstrap_intervals(report.labels, pred, len(class_names))
    if len(class_names) > MAX_PER_CLASS_METRICS:
        intervals = {k: v for k, v in intervals.items() if not k.startswith("f1_class_")}
    return interval_metrics(intervals, split, class_names)


def log_trust(report, class_names: list[str], split: str, digest: str, image_names=None) -> dict[str, float]:
    """How far the numbers can be trusted: per-image predictions, bootstrap intervals, `<split>_ece`
    (15 bins) and the reliability diagram `evaluation/<split>_reliability.png`. Returns the metrics."""
    import matplotlib.pyplot as plt

    log_predictions(report.labels, report.probabilities, class_names, split, digest, image_names)
    ece = expected_calibration_error(report.probabilities, report.labels)
    metrics = {**interval_metrics_of(report, class_names, split), f"{split}_ece": ece}
    log_metrics(metrics)
    fig = reliability_figure(report.probabilities, report.labels)
    mlflow.log_figure(fig, f"evaluation/{split}_reliability.png")
    plt.close(fig)
    return metrics


def log_val_calibration(net, val, class_names: list[str], digest: str, calibrate: bool) -> float | None:
    """Fit the model's temperature on the validation split (fp32 logits in eval mode; one scalar, so
    the argmax and accuracy stay) unless `calibrate` is false; log `val_ece_uncalibrated`, `val_ece`
    and `temperature`, and the val predictions (calibrated) that tune's summary compares.
    Returns the temperature, or None when not calibrating."""
    if len(val) < 2:
        return None  # nothing to fit on, and nothing worth a predictions table
    logits = predict_logits(net, torch.from_numpy(val.images).to(next(net.parameters()).device), None)
    logits = logits.cpu().double().numpy()
    temperature = fit_temperature(logits, val.labels) if calibrate else None
    plain = calibrated_probabilities(logits, 1.0)
    probs = calibrated_probabilities(logits, temperature or 1.0)
    metrics = {"val_ece_uncalibrated": expected_calibration_error(plain, val.labels),
               "val_ece": expected_calibration_error(probs, val.labels)}
    log_metrics({**metrics, **({"temperature": temperature} if temperature else {})})
    log_predictions(val.labels, probs, class_names, "val", digest)
    return temperature


def load_scored_images(run_id: str, split: str) -> ScoredImages | None:
    """A run's per-image predictions on `split` (`evaluation/<split>_predictions.csv`), with the digest
    of the images they are on; None for a run that logged none."""
    digest = mlflow.get_run(run_id).data.tags.get(TAG_DIGEST.format(split=split))
    if not digest:
        return None  # evaluated before predictions were logged
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=tmp,
                                                       artifact_path=PREDICTIONS_PATH.format(split=split))
        except (MlflowException, OSError):
            return None
        return scored_images(read_predictions(path), digest, split)
