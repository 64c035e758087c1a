"""How sure a metric is: bootstrap intervals, and paired tests between runs scored on the same images.

Two runs 0.8 points of macro-F1 apart on 1,000 images are within sampling noise (about +-1.5
points there). The intervals say how far a metric could move on another sample of the same size;
the paired tests say whether two runs differ on the images both were scored on, which is far more
sensitive than comparing two intervals because most images are right (or wrong) for both.

numpy, scipy and pandas only: the core imports neither mlflow nor optuna.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest, bootstrap

from pipeline.errors import PipelineError
from pipeline.evaluate.keys import class_keys

RESAMPLES = 1000
LEVEL = 0.95
ALPHA = 0.05  # "indistinguishable from the best" means no test rejects at this level
MAX_BATCH_LABELS = 2_000_000  # resampled labels per vectorised call: bounds memory at ~50 MB for any n
INTERVAL_METHOD = "percentile"  # BCa needs a jackknife of n statistics: n x n labels, too slow at 10,000 images


# --- counting ------------------------------------------------------------------------------

def _labels(values, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise PipelineError(f"{name} must be a 1-D array of integer class indices, got shape {array.shape} "
                            f"dtype {array.dtype}; pass the class index of each image")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise PipelineError(f"{name} holds class indices outside 0..{num_classes - 1}; "
                            f"pass num_classes covering every class")
    return array.astype(np.int32)  # resampled copies are n x batch: half the memory of int64


def _paired_labels(num_classes: int, arrays: Mapping[str, object]) -> list[np.ndarray]:
    if num_classes < 1:
        raise PipelineError(f"num_classes must be at least 1, got {num_classes}")
    checked = [_labels(values, name, num_classes) for name, values in arrays.items()]
    sizes = {len(a) for a in checked}
    if len(sizes) != 1:
        raise PipelineError(f"{', '.join(arrays)} have different lengths {sorted(sizes)}; "
                            f"pass one entry per image, for the same images")
    if sizes.pop() < 2:
        raise PipelineError("a bootstrap needs at least 2 images; evaluate on more images")
    return checked


def _per_class_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int):
    """(true positives, support, predicted) per class for each row of (rows, n) label arrays.

    Counted with one bincount per quantity on (row, class) codes: rows x classes bins rather than
    the rows x classes^2 of a full confusion matrix, so 1,000 classes stay cheap."""
    rows = y_true.shape[0]
    codes_true = (np.arange(rows)[:, None] * num_classes + y_true).ravel()
    codes_pred = (np.arange(rows)[:, None] * num_classes + y_pred).ravel()
    bins = rows * num_classes
    hit = (y_true == y_pred).ravel()
    tp = np.bincount(codes_true[hit], minlength=bins).reshape(rows, num_classes)
    support = np.bincount(codes_true, minlength=bins).reshape(rows, num_classes)
    predicted = np.bincount(codes_pred, minlength=bins).reshape(rows, num_classes)
    return tp, support, predicted


def _scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy, macro-F1 and each class's F1 along the last axis: shape (2 + classes, *leading).

    F1 = 2 tp / (support + predicted), 0 where a class is neither present nor predicted: the same
    as scikit-learn's f1_score(labels=range(num_classes), zero_division=0)."""
    leading, n = y_true.shape[:-1], y_true.shape[-1]
    tp, support, predicted = _per_class_counts(y_true.reshape(-1, n), y_pred.reshape(-1, n), num_classes)
    denominator = support + predicted
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    scores = np.vstack([tp.sum(1) / n, f1.mean(1), f1.T])
    return scores.reshape(len(scores), *leading)


def _bootstrap(data: Sequence[np.ndarray], statistic, resamples: int, seed: int, level: float):
    """scipy's paired, vectorised percentile bootstrap: every array resampled with the same indices."""
    if resamples < 1:
        raise PipelineError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise PipelineError(f"level must lie between 0 and 1 (e.g. 0.95), got {level}")
    batch = max(1, min(resamples, MAX_BATCH_LABELS // len(data[0])))
    return bootstrap(tuple(data), statistic, n_resamples=resamples, batch=batch, vectorized=True, paired=True,
                     confidence_level=level, method=INTERVAL_METHOD, rng=np.random.default_rng(seed))


# --- intervals -----------------------------------------------------------------------------

def score_names(num_classes: int) -> list[str]:
    """The keys of bootstrap_intervals, in order: accuracy, f1_macro, f1_class_<index>."""
    return ["accuracy", "f1_macro", *(f"f1_class_{c}" for c in range(num_classes))]


def bootstrap_intervals(y_true, y_pred, num_classes: int, *, resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (seeded, `resamples` resamples of the images) for accuracy,
    macro-F1 and each class's F1, keyed as score_names() says."""
    y_true, y_pred = _paired_labels(num_classes, {"y_true": y_true, "y_pred": y_pred})

    def statistic(t, p, axis=-1):
        return _scores(t, p, num_classes)

    interval = _bootstrap((y_true, y_pred), statistic, resamples, seed, level).confidence_interval
    return {name: (float(low), float(high))
            for name, low, high in zip(score_names(num_classes), interval.low, interval.high)}


def interval_metrics(intervals: Mapping[str, tuple[float, float]], prefix: str,
                     class_names: Sequence[str]) -> dict[str, float]:
    """MLflow-ready metric names for bootstrap_intervals' output: `<prefix>_accuracy_ci_low`,
    `<prefix>_f1_macro_ci_high`, `<prefix>_f1_<class key>_ci_low`, ... A class's key is
    pipeline.evaluate.keys.class_keys(names, reserved=("macro", "weighted")), as its F1 metric is named."""
    keys = class_keys(list(class_names), reserved=("macro", "weighted"))
    metrics = {}
    for key, (low, high) in intervals.items():
        name = f"f1_{keys[class_names[int(key.removeprefix('f1_class_'))]]}" if key.startswith("f1_class_") else key
        metrics[f"{prefix}_{name}_ci_low"] = low
        metrics[f"{prefix}_{name}_ci_high"] = high
    return metrics


def with_interval(metrics: Mapping[str, float], name: str) -> str:
    """`0.9778 (95% CI 0.95-0.99)` from metric `name` and its `_ci_low`/`_ci_high`; the value alone
    when the interval is missing, `nan` when the metric is."""
    value = f"{metrics.get(name, float('nan')):.4f}"
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return value if low is None or high is None else f"{value} ({LEVEL:.0%} CI {low:.2f}-{high:.2f})"


# --- paired tests --------------------------------------------------------------------------

def mcnemar_exact(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value: are a and b equally accurate on these images?

    Only the discordant images carry information (right for one run, wrong for the other); under
    the null each is equally likely to favour either run, so their split is Binomial(d, 1/2)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise PipelineError(f"correct_a and correct_b must be 1-D and of equal length, got shapes {a.shape} and "
                            f"{b.shape}; pass one right/wrong flag per image, for the same images")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0  # no image tells the runs apart
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_bootstrap_f1(y_true, pred_a, pred_b, num_classes: int, resamples: int = RESAMPLES,
                        seed: int = 0) -> float:
    """Two-sided p-value for "a and b have the same macro-F1 on images like these".

    Both runs are scored on the same resampled images; the resampled differences, shifted to
    centre on 0 (the null), give p = (1 + #{|d* - d| >= |d|}) / (1 + resamples)
    (Efron & Tibshirani 1993, 16.4); the +1 keeps p above 0 with a finite number of resamples."""
    y_true, pred_a, pred_b = _paired_labels(num_classes, {"y_true": y_true, "pred_a": pred_a, "pred_b": pred_b})

    def difference(t, a, b, axis=-1):
        return _scores(t, a, num_classes)[1] - _scores(t, b, num_classes)[1]

    observed = float(difference(y_true, pred_a, pred_b))
    resampled = _bootstrap((y_true, pred_a, pred_b), difference, resamples, seed, LEVEL).bootstrap_distribution
    # a tiny tolerance: d* == d from differently ordered float sums must count as "as extreme"
    extreme = np.abs(resampled - observed) >= abs(observed) - 1e-12
    return float((1 + extreme.sum()) / (1 + resamples))


def compare_to_best(y_true, predictions: Mapping[str, np.ndarray], num_classes: int, *, best: str | None = None,
                    resamples: int = RESAMPLES, seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """Each run against the best one on the same images. `predictions` maps a run's name to its
    predicted class per image (same images, same order as y_true); the best is `best`, else the
    run with the highest macro-F1 (the first of a tie).

    One row per run, in the given order: accuracy, f1_macro, p_mcnemar (accuracy), p_f1_macro
    (paired bootstrap, the same resamples for every run) and indistinguishable (neither p below
    alpha; the best run is indistinguishable from itself, p = 1). No correction for testing
    several runs: with many runs some look different by chance."""
    if not predictions:
        raise PipelineError("no runs to compare; pass the predictions of at least one run")
    named = {"y_true": y_true, **{f"predictions of {run!r}": pred for run, pred in predictions.items()}}
    y_true, *checked = _paired_labels(num_classes, named)
    predictions = dict(zip(predictions, checked))
    scores = {run: _scores(y_true, pred, num_classes) for run, pred in predictions.items()}
    if best is None:
        best = max(scores, key=lambda run: scores[run][1])
    elif best not in predictions:
        raise PipelineError(f"best run {best!r} is not among the predictions; pass one of {', '.join(predictions)}")
    rows = []
    for run, pred in predictions.items():
        p_mcnemar, p_f1 = _test_pair(y_true, pred, predictions[best], num_classes, resamples, seed)
        rows.append({"run": run, "accuracy": scores[run][0], "f1_macro": scores[run][1], "p_mcnemar": p_mcnemar,
                     "p_f1_macro": p_f1, "indistinguishable": bool(min(p_mcnemar, p_f1) >= alpha)})
    return pd.DataFrame(rows).set_index("run")


def _test_pair(y_true, pred, best_pred, num_classes: int, resamples: int, seed: int) -> tuple[float, float]:
    """(McNemar p, paired bootstrap macro-F1 p) of one run against the best."""
    y_true, pred, best_pred = np.asarray(y_true), np.asarray(pred), np.asarray(best_pred)
    return (mcnemar_exact(pred == y_true, best_pred == y_true),
            paired_bootstrap_f1(y_true, pred, best_pred, num_classes, resamples, seed))


# --- compare's table -----------------------------------------------------------------------

@dataclass(frozen=True)
class ScoredImages:
    """One evaluate run's per-image predictions on one split, as its predictions artifact holds them."""

    digest: str  # the dataset digest the split was scored on: equal digests and splits mean the same images
    split: str  # "test", "val", ...
    y_true: np.ndarray  # true class index per image
    y_pred: np.ndarray  # predicted class index per image, same order
    num_classes: int  # the model's class count (probability columns), for macro-F1 over every class


MARK_BEST, MARK_TIE, MARK_DIFFERENT, MARK_UNPAIRED = "best", "tie", "differs", "unpaired"


def significance_columns(table: pd.DataFrame, scored: Mapping[str, ScoredImages], key: str = "evaluate_run_id",
                         *, resamples: int = RESAMPLES, seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """p_mcnemar, p_f1_macro and vs_best for compare's table (index aligned with `table`).

    The reference is the first row in table order (compare sorts best first) whose `key` has
    predictions in `scored`; rows scored on the same digest and split, with the same true labels,
    are tested against it: vs_best is MARK_BEST, MARK_TIE (no test rejects at `alpha`) or
    MARK_DIFFERENT. Rows with predictions on other images are MARK_UNPAIRED; rows without
    predictions get empty cells."""
    columns = pd.DataFrame({"p_mcnemar": np.nan, "p_f1_macro": np.nan, "vs_best": ""}, index=table.index)
    keys = table[key].where(table[key].isin(list(scored)))
    if keys.isna().all():
        return columns
    first = keys.first_valid_index()
    reference = scored[keys[first]]
    for index, run in keys.dropna().items():
        images = scored[run]
        if not _same_images(images, reference):
            columns.loc[index, "vs_best"] = MARK_UNPAIRED
            continue
        num_classes = max(images.num_classes, reference.num_classes)
        p_values = _test_pair(reference.y_true, images.y_pred, reference.y_pred, num_classes, resamples, seed)
        columns.loc[index, ["p_mcnemar", "p_f1_macro"]] = p_values
        tie = MARK_BEST if index == first else MARK_TIE
        columns.loc[index, "vs_best"] = tie if min(p_values) >= alpha else MARK_DIFFERENT
    return columns


def _same_images(a: ScoredImages, b: ScoredImages) -> bool:
    return a.digest == b.digest and a.split == b.split and np.array_equal(a.y_true, b.y_true)
