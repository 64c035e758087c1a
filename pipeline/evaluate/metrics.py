"""Classification metrics, all from scikit-learn so the numbers match what users compute."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)


def summary_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, prefix: str) -> dict[str, float]:
    """accuracy plus macro and weighted precision/recall/F1, keyed `<prefix>_<name>`."""
    labels = list(range(num_classes))
    out = {f"{prefix}_accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out.update(
            {f"{prefix}_precision_{avg}": float(p), f"{prefix}_recall_{avg}": float(r), f"{prefix}_f1_{avg}": float(f)}
        )
    return out


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(class_names))), average=None, zero_division=0
    )
    return pd.DataFrame({"class": class_names, "precision": p, "recall": r, "f1": f, "support": s})


def report_text(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> str:
    return classification_report(
        y_true, y_pred, labels=list(range(len(class_names))), target_names=class_names, digits=4, zero_division=0
    )


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def average_precision(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest average precision of each class's probability column; NaN for a class with no
    true images (its precision-recall curve is undefined), so a macro mean skips it."""
    return np.array(
        [
            average_precision_score(y_true == c, probs[:, c]) if (y_true == c).any() else np.nan
            for c in range(probs.shape[1])
        ]
    )
