"""Per-image predictions as a table: what evaluate logs as `evaluation/<split>_predictions.csv`, and
reading it back as stats.ScoredImages so two runs scored on the same images can be tested pairwise.

One row per image: index (its position in the split), image (file name where known, else the
index), true_class, predicted_class, then prob_<class name> for every class of the model, in the
model's class order. numpy/pandas only: the core imports neither mlflow nor optuna.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.evaluate.stats import ScoredImages

PROB_PREFIX = "prob_"  # as the served model names its probability columns (pipeline.track.serving)
PREDICTIONS_PATH = "evaluation/{split}_predictions.csv"
TAG_DIGEST = "pipeline.scored_digest.{split}"  # the digest of the images a run's <split> predictions are on
COLUMNS = ("index", "image", "true_class", "predicted_class")


def array_digest(images: np.ndarray | None, labels: np.ndarray) -> str:
    """A digest of decoded images and their labels, for images that have no dataset manifest (a user's
    folder): equal digests mean the same pixels and labels in the same order."""
    h = hashlib.sha256()
    for array in (images, labels):
        if array is not None:
            array = np.ascontiguousarray(array)
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(array.tobytes())
    return h.hexdigest()[:16]


def predictions_table(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                      image_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The predictions table (see the module docstring) of images with true `labels` and `probs`."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if probs.shape != (len(labels), len(class_names)):
        raise PipelineError(f"probabilities of shape {probs.shape} do not fit {len(labels)} images of "
                            f"{len(class_names)} classes; pass one row per image, one column per class")
    names = [str(n) for n in image_names] if image_names is not None else [str(i) for i in range(len(labels))]
    frame = pd.DataFrame({"index": np.arange(len(labels)), "image": names,
                          "true_class": [class_names[i] for i in labels],
                          "predicted_class": [class_names[i] for i in probs.argmax(1)]})
    return pd.concat([frame, pd.DataFrame(probs, columns=[PROB_PREFIX + c for c in class_names])], axis=1)


def class_names_of(table: pd.DataFrame) -> list[str]:
    """The model's class names, in order, from a predictions table's probability columns."""
    return [c[len(PROB_PREFIX):] for c in table.columns if c.startswith(PROB_PREFIX)]


def scored_images(table: pd.DataFrame, digest: str, split: str) -> ScoredImages:
    """A predictions table as stats.ScoredImages (class indices in the model's class order)."""
    names = class_names_of(table)
    index = {name: i for i, name in enumerate(names)}
    # Class names such as "7" come back from CSV as numbers: compare them as text.
    y_true = table["true_class"].astype(str).map(index)
    y_pred = table["predicted_class"].astype(str).map(index)
    if y_true.isna().any() or y_pred.isna().any():
        raise PipelineError("a predictions table names a class without a probability column; "
                            "pass a table written by predictions_table")
    return ScoredImages(digest, split, y_true.to_numpy(np.int64), y_pred.to_numpy(np.int64), len(names))


def read_predictions(path: str) -> pd.DataFrame:
    """A predictions CSV, class names kept as text (a class named `007` stays `007`)."""
    return pd.read_csv(path, dtype={"image": str, "true_class": str, "predicted_class": str})
