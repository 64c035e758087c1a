"""Whether a model's confidence means what it says: expected calibration error, reliability
diagrams, and temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

A temperature T divides the logits before the softmax: T > 1 softens over-confident predictions,
T < 1 sharpens timid ones, and the argmax (so accuracy) never changes. numpy/scipy/matplotlib
only: the core imports neither mlflow nor optuna.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from pipeline.errors import PipelineError
from pipeline.evaluate.plots import pyplot

BINS = 15
# T is searched on log T in [log 0.05, log 20]: wide enough for any real network, and finite when
# the split is perfectly separable (there the NLL keeps falling as T -> 0 until it underflows to 0;
# some T < 1 in that flat stretch comes back, never 0 or NaN).
TEMPERATURE_RANGE = (0.05, 20.0)


def _probs_and_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or not len(labels):
        raise PipelineError(f"expected probabilities (images, classes) and one label per image, got shapes "
                            f"{probs.shape} and {labels.shape}; pass the same images to both")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise PipelineError(f"labels must be class indices 0..{probs.shape[1] - 1}; "
                            f"pass the true class index per image")
    return probs, labels.astype(np.int64)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins; accuracy and confidence are NaN in an empty bin."""

    edges: np.ndarray  # bins + 1 edges from 0 to 1
    counts: np.ndarray  # images whose top-class confidence falls in each bin
    accuracy: np.ndarray  # fraction of them predicted right
    confidence: np.ndarray  # their mean top-class confidence

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (bin's share of images) * |accuracy - confidence|."""
        gap = np.abs(self.accuracy - self.confidence)
        return float(np.nansum(gap * self.counts) / self.counts.sum())


def reliability_bins(probs, labels, bins: int = BINS) -> ReliabilityBins:
    """Bin each image by its top-class probability (bin b holds (b/bins, (b+1)/bins], 0 joins the
    first) and measure accuracy and mean confidence per bin."""
    probs, labels = _probs_and_labels(probs, labels)
    if bins < 1:
        raise PipelineError(f"bins must be at least 1, got {bins}")
    confidence = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: NaN, by design
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), counts, accuracy, mean_confidence)


def expected_calibration_error(probs, labels, bins: int = BINS) -> float:
    """ECE over `bins` equal-width bins of top-class confidence (0 = calibrated; in [0, 1])."""
    return reliability_bins(probs, labels, bins).ece


def reliability_figure(probs, labels, bins: int = BINS):
    """A matplotlib Figure: accuracy against confidence per bin (bars), the diagonal a calibrated
    model would follow, and below it how many images each bin holds."""
    plt = pyplot()
    found = reliability_bins(probs, labels, bins)
    width = np.diff(found.edges)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    accuracy = np.nan_to_num(found.accuracy)  # an empty bin: no bar
    top.bar(found.edges[:-1], accuracy, width, align="edge", edgecolor="black", label="accuracy")
    top.bar(found.edges[:-1], np.nan_to_num(found.confidence) - accuracy, width, bottom=accuracy, align="edge",
            fill=False, hatch="//", edgecolor="tab:red", label="gap to confidence")  # either sign
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability ({bins} bins): ECE {found.ece:.4f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(found.edges[:-1], found.counts, width, align="edge", edgecolor="black", color="tab:gray")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="images")
    fig.tight_layout()
    return fig


def _logits_and_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    _probs_and_labels(np.zeros_like(logits), labels)  # the same shape and label checks
    if not np.isfinite(logits).all():
        raise PipelineError("logits hold NaN or infinite values; fix the model's outputs before calibrating")
    return logits, np.asarray(labels, dtype=np.int64)


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean NLL of the true class under softmax(logits / temperature)."""
    logits, labels = _logits_and_labels(logits, labels)
    return _nll(logits, labels, temperature)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits, labels) -> float:
    """The T > 0 (within TEMPERATURE_RANGE) minimising the NLL of softmax(logits / T) on these images.

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), hence unimodal
    in log T, so bounded Brent on log T finds the global minimum."""
    logits, labels = _logits_and_labels(logits, labels)
    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: _nll(logits, labels, np.exp(log_t)), bounds=(low, high), method="bounded",
                            options={"xatol": 1e-5})
    return float(np.exp(found.x))


def calibrated_probabilities(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature): what the served model's probabilities become once calibrated."""
    if not temperature > 0:
        raise PipelineError(f"temperature must be positive, got {temperature}; fit one with fit_temperature")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def temperature_of(meta: dict) -> float:
    """A logged model's temperature, fitted on the validation split at the end of training
    (model_meta.json's "temperature"); 1.0, plain softmax, for a model trained with calibrate=false
    (stored as null) or before calibration existed."""
    return float(meta.get("temperature") or 1.0)

