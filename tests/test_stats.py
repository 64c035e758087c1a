import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from pipeline.errors import PipelineError
from pipeline.evaluate.stats import (
    MARK_BEST,
    MARK_DIFFERENT,
    MARK_TIE,
    MARK_UNPAIRED,
    ScoredImages,
    bootstrap_intervals,
    compare_to_best,
    interval_metrics,
    mcnemar_exact,
    paired_bootstrap_f1,
    significance_columns,
)


def _predictions(n: int, classes: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True labels and predictions right with probability `accuracy` (a wrong guess may land right)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, np.where(rng.random(n) < accuracy, y, rng.integers(0, classes, n))


def _spoil(y: np.ndarray, pred: np.ndarray, count: int, classes: int) -> np.ndarray:
    """pred made wrong on its first `count` right images: a run worse on exactly those images."""
    worse = pred.copy()
    right = np.flatnonzero(pred == y)[:count]
    worse[right] = (y[right] + 1) % classes
    return worse


def test_accuracy_interval_agrees_with_the_normal_approximation_on_10000_predictions():
    y, pred = _predictions(10_000, 10, 0.8, seed=1)
    low, high = bootstrap_intervals(y, pred, 10)["accuracy"]
    p = np.mean(y == pred)
    half = 1.96 * math.sqrt(p * (1 - p) / len(y))
    assert abs(low - (p - half)) < 0.003 and abs(high - (p + half)) < 0.003


def test_f1_intervals_contain_scikit_learns_point_estimates():
    y, pred = _predictions(2_000, 5, 0.7, seed=2)
    pred[pred == 4] = 3  # class 4 never predicted: its F1 is 0, and so is its whole interval
    intervals = bootstrap_intervals(y, pred, 6)  # class 5 neither present nor predicted: F1 0 as sklearn says
    per_class = f1_score(y, pred, labels=range(6), average=None, zero_division=0)
    macro = f1_score(y, pred, labels=range(6), average="macro", zero_division=0)
    low, high = intervals["f1_macro"]
    assert low < macro < high and high - low < 0.1
    for c, f1 in enumerate(per_class):
        low, high = intervals[f"f1_class_{c}"]
        assert low <= f1 <= high
    assert intervals["f1_class_4"] == intervals["f1_class_5"] == (0.0, 0.0)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    y, pred = _predictions(500, 3, 0.75, seed=3)
    first = bootstrap_intervals(y, pred, 3, resamples=200, seed=7)
    assert bootstrap_intervals(y, pred, 3, resamples=200, seed=7) == first
    assert bootstrap_intervals(y, pred, 3, resamples=200, seed=8) != first


def test_a_lower_level_gives_a_narrower_interval():
    y, pred = _predictions(1_000, 4, 0.7, seed=4)
    wide = bootstrap_intervals(y, pred, 4, level=0.95)["accuracy"]
    narrow = bootstrap_intervals(y, pred, 4, level=0.5)["accuracy"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_interval_metrics_are_named_by_split_metric_and_class_name():
    y, pred = _predictions(100, 2, 0.9, seed=5)
    intervals = bootstrap_intervals(y, pred, 2, resamples=50)
    metrics = interval_metrics(intervals, "test", ["cat", "dog"])
    assert metrics["test_accuracy_ci_low"] == intervals["accuracy"][0]
    assert metrics["test_f1_macro_ci_high"] == intervals["f1_macro"][1]
    assert metrics["test_f1_dog_ci_low"] == intervals["f1_class_1"][0]
    assert len(metrics) == 2 * 4


def test_interval_metrics_name_classes_by_their_metric_key_not_the_raw_name():
    from pipeline.evaluate.keys import class_keys

    names = ["bird (small)", "macro"]
    y, pred = _predictions(100, 2, 0.9, seed=6)
    metrics = interval_metrics(bootstrap_intervals(y, pred, 2, resamples=20), "test", names)
    keys = class_keys(names, reserved=("macro", "weighted"))
    assert f"test_f1_{keys['bird (small)']}_ci_low" in metrics and keys["bird (small)"] != "bird (small)"
    assert f"test_f1_{keys['macro']}_ci_high" in metrics and keys["macro"] != "macro"  # never overwrites f1_macro


def test_inputs_a_user_can_get_wrong_are_errors_that_say_so():
    with pytest.raises(PipelineError, match="different lengths"):
        bootstrap_intervals([0, 1, 1], [0, 1], 2)
    with pytest.raises(PipelineError, match="outside 0..1"):
        bootstrap_intervals([0, 1, 2], [0, 1, 1], 2)
    with pytest.raises(PipelineError, match="integer class indices"):
        bootstrap_intervals([0.0, 1.0], [0, 1], 2)
    with pytest.raises(PipelineError, match="equal length"):
        mcnemar_exact([True, False], [True])


def test_mcnemar_matches_a_hand_counted_table():
    # both right 50, only a right 9, only b right 2, both wrong 10
    a = np.array([True] * 50 + [True] * 9 + [False] * 2 + [False] * 10)
    b = np.array([True] * 50 + [False] * 9 + [True] * 2 + [False] * 10)
    discordant, fewer = 9 + 2, 2
    by_hand = 2 * sum(math.comb(discordant, k) for k in range(fewer + 1)) / 2 ** discordant
    assert mcnemar_exact(a, b) == pytest.approx(by_hand)
    assert mcnemar_exact(b, a) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(0.0654296875)


def test_mcnemar_without_discordant_images_finds_no_difference():
    right = np.array([True, True, False])
    assert mcnemar_exact(right, right) == 1.0


def test_paired_bootstrap_finds_no_difference_between_identical_predictions():
    y, pred = _predictions(300, 3, 0.7, seed=6)
    assert paired_bootstrap_f1(y, pred, pred, 3, resamples=200) == 1.0


def test_paired_tests_detect_a_difference_that_overlapping_intervals_hide():
    # b is a minus 30 right images out of 2,000 (1.5 points): within either run's interval, but
    # every discordant image favours a, which only a test on the same images can see
    y, a = _predictions(2_000, 5, 0.85, seed=7)
    b = _spoil(y, a, 30, 5)
    a_low, a_high = bootstrap_intervals(y, a, 5)["f1_macro"]
    b_low, b_high = bootstrap_intervals(y, b, 5)["f1_macro"]
    assert a_low < b_high and b_low < a_high
    assert paired_bootstrap_f1(y, a, b, 5) < 0.01
    assert mcnemar_exact(a == y, b == y) < 1e-6


def test_paired_bootstrap_is_two_sided_and_finds_no_difference_in_a_single_image():
    y, a = _predictions(1_000, 4, 0.8, seed=8)
    b = _spoil(y, a, 1, 4)
    assert paired_bootstrap_f1(y, a, b, 4, resamples=300) == paired_bootstrap_f1(y, b, a, 4, resamples=300)
    assert paired_bootstrap_f1(y, a, b, 4, resamples=300) > 0.5


def test_compare_to_best_scores_like_scikit_learn_and_marks_runs_against_the_best():
    y, good = _predictions(1_500, 4, 0.85, seed=9)
    close = _spoil(y, good, 2, 4)
    poor = _spoil(y, good, 150, 4)
    found = compare_to_best(y, {"poor": poor, "good": good, "close": close}, 4, resamples=300)
    assert list(found.index) == ["poor", "good", "close"]
    for run, pred in (("poor", poor), ("good", good), ("close", close)):
        assert found.loc[run, "f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert found.loc[run, "accuracy"] == pytest.approx(np.mean(y == pred))
    assert found.loc["good", ["p_mcnemar", "p_f1_macro"]].tolist() == [1.0, 1.0]
    assert found["indistinguishable"].to_dict() == {"poor": False, "good": True, "close": True}


def test_compare_to_best_takes_the_best_run_named():
    y, good = _predictions(500, 3, 0.9, seed=10)
    poor = _spoil(y, good, 100, 3)
    found = compare_to_best(y, {"poor": poor, "good": good}, 3, best="poor", resamples=100)
    assert found.loc["poor", "p_mcnemar"] == 1.0 and not found.loc["good", "indistinguishable"]
    with pytest.raises(PipelineError, match="not among the predictions"):
        compare_to_best(y, {"good": good}, 3, best="other")


def test_significance_columns_pair_rows_on_the_same_images_only():
    y, good = _predictions(1_000, 3, 0.85, seed=11)
    other_y, other_pred = _predictions(1_000, 3, 0.99, seed=12)
    scored = {
        "e-best": ScoredImages("sha-1", "test", y, good, 3),
        "e-close": ScoredImages("sha-1", "test", y, _spoil(y, good, 1, 3), 3),
        "e-poor": ScoredImages("sha-1", "test", y, _spoil(y, good, 120, 3), 3),
        "e-other-data": ScoredImages("sha-2", "test", other_y, other_pred, 3),
        "e-other-split": ScoredImages("sha-1", "val", y, good, 3),
    }
    order = ["e-best", "e-other-data", "e-close", "", "e-poor", "e-other-split"]  # "": a run never evaluated
    table = pd.DataFrame({"evaluate_run_id": order}, index=[10, 11, 12, 13, 14, 15])
    columns = significance_columns(table, scored, resamples=200)
    assert columns.index.tolist() == table.index.tolist()
    assert columns["vs_best"].tolist() == [MARK_BEST, MARK_UNPAIRED, MARK_TIE, "", MARK_DIFFERENT, MARK_UNPAIRED]
    assert columns.loc[10, ["p_mcnemar", "p_f1_macro"]].tolist() == [1.0, 1.0]
    assert columns.loc[[11, 13, 15], "p_mcnemar"].isna().all()
    assert columns.loc[12, "p_mcnemar"] == 1.0  # one discordant image: binomial p of 1 in 1 is 1
    assert columns.loc[14, "p_mcnemar"] < 0.05 and columns.loc[14, "p_f1_macro"] < 0.05
