"""An evaluation report (pipeline.evaluation) logged to the active MLflow run: metrics, tables and plots."""

from __future__ import annotations

import csv
import io

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from pipeline.evaluation import metric_keys
from pipeline.plots import misclassified_grid, plot_confusion, precision_recall_figure
from pipeline.tracking import log_metrics

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


def log_evaluation(report, class_names: list[str], split: str, images: np.ndarray | None = None) -> None:
    """Metrics, the per-class CSV table, the text report, the confusion matrix (PNG + CSV), per-class
    precision-recall curves (PNG) and, given the images, the most confidently misclassified (PNG)."""
    log_metrics(report.metrics)
    mlflow.log_dict({key: name for name, key in metric_keys(class_names).items()}, CLASS_KEYS_ARTIFACT)
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
