import numpy as np
import pytest
from scipy.special import softmax

from pipeline.errors import PipelineError
from pipeline.evaluate.calibration import (
    TEMPERATURE_RANGE,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    reliability_figure,
)


def _ece_by_loop(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE the textbook way: one pass per bin (lo, hi], confidence 0 in the first."""
    confidence, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(labels)) if lo < confidence[i] <= hi or (b == 0 and confidence[i] == 0)]
        if members:
            accuracy = np.mean([pred[i] == labels[i] for i in members])
            mean_confidence = np.mean([confidence[i] for i in members])
            total += len(members) / len(labels) * abs(accuracy - mean_confidence)
    return total


def _overconfident(n: int, classes: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), logits scale * z: calibrated at exactly T = scale."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    cumulative = softmax(z, axis=1).cumsum(1)
    labels = (rng.random((n, 1)) > cumulative).sum(1)
    return scale * z, labels


def test_ece_matches_a_direct_loop_computation():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(0, 2, (300, 4)), axis=1)
    labels = rng.integers(0, 4, 300)
    for bins in (1, 5, 15):
        assert expected_calibration_error(probs, labels, bins) == pytest.approx(_ece_by_loop(probs, labels, bins))


def test_ece_of_a_hand_worked_case():
    # two images at confidence 0.9, one right: |0.5 - 0.9|; two at 0.6, both right: |1 - 0.6|
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    found = reliability_bins(probs, labels, bins=10)
    assert found.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]  # 0.6 falls in (0.5, 0.6], 0.9 in (0.8, 0.9]
    assert np.isnan(found.accuracy[0]) and found.accuracy[8] == 0.5


def test_reliability_figure_shows_the_bins_and_the_ece(tmp_path):
    logits, labels = _overconfident(400, 3, 3.0, seed=1)
    probs = softmax(logits, axis=1)
    fig = reliability_figure(probs, labels, bins=10)
    top, bottom = fig.axes
    assert f"ECE {expected_calibration_error(probs, labels, 10):.4f}" in top.get_title()
    counts = [patch.get_height() for patch in bottom.patches]
    assert counts == reliability_bins(probs, labels, 10).counts.tolist()
    fig.savefig(tmp_path / "reliability.png")


def test_temperature_scaling_keeps_argmax_and_lowers_nll_on_its_split():
    logits, labels = _overconfident(3_000, 5, 4.0, seed=2)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.15)  # the scale the logits were inflated by
    calibrated = calibrated_probabilities(logits, temperature)
    assert (calibrated.argmax(1) == logits.argmax(1)).all()
    assert negative_log_likelihood(logits, labels, temperature) < negative_log_likelihood(logits, labels) - 0.1
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(softmax(logits, axis=1), labels)
    grid = np.exp(np.linspace(np.log(0.5), np.log(20), 400))  # an independent search: nothing on it does better
    assert negative_log_likelihood(logits, labels, temperature) <= min(
        negative_log_likelihood(logits, labels, t) for t in grid) + 1e-6


def test_a_perfectly_separable_split_gives_a_finite_temperature():
    logits = np.array([[5.0, -5.0], [-4.0, 4.0], [3.0, -3.0]])
    labels = np.array([0, 1, 0])
    temperature = fit_temperature(logits, labels)
    # the NLL falls towards 0 as T -> 0 (it underflows to exactly 0 well before the lower bound):
    # a sharpening T inside the range, never 0, NaN or an error
    assert TEMPERATURE_RANGE[0] <= temperature < 1.0
    assert negative_log_likelihood(logits, labels, temperature) < negative_log_likelihood(logits, labels)
    calibrated = calibrated_probabilities(logits, temperature)
    assert np.isfinite(calibrated).all() and (calibrated.argmax(1) == labels).all()


def test_inputs_a_user_can_get_wrong_are_errors_that_say_so():
    with pytest.raises(PipelineError, match="one label per image"):
        expected_calibration_error(np.full((3, 2), 0.5), np.array([0, 1]))
    with pytest.raises(PipelineError, match="class indices 0..1"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(PipelineError, match="NaN or infinite"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(PipelineError, match="positive"):
        calibrated_probabilities(np.zeros((1, 2)), 0.0)
