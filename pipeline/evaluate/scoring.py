"""Score a model on images: predictions, metrics, per-class table, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.evaluate.keys import class_keys
from pipeline.evaluate.metrics import average_precision, confusion, per_class_table, report_text, summary_metrics
from pipeline.model.device import EVAL_BATCH, predict_logits, resolve_amp_dtype

MAX_PER_CLASS_METRICS = 20  # beyond this many classes, per-class numbers go to the CSV table only
AVERAGES = ("macro", "weighted")  # `<prefix>_f1_macro` etc.: no class key may equal these


def metric_keys(class_names: list[str]) -> dict[str, str]:
    """{class name: the part of its per-class metric names}: the name itself where MLflow accepts it
    (`test_f1_cat`, digits' `test_f1_7`), else a hashed key (pipeline.evaluate.keys) that log_evaluation maps
    back to the name in `evaluation/class_keys.json`."""
    return class_keys(class_names, reserved=AVERAGES)


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    per_class: pd.DataFrame
    report: str
    confusion: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    average_precision: np.ndarray  # per class, one vs rest; NaN for a class with no true images


def score_net(net, images: np.ndarray, labels: np.ndarray, class_names: list[str], prefix: str, device: torch.device,
              precision: str = "fp32", tta=False, batch_size=EVAL_BATCH, temperature: float = 1.0) -> EvaluationReport:
    """evaluate_images with the network moved to `device` (channels_last) under `precision`'s autocast.

    fp32 unless asked otherwise: the served pyfunc predicts in fp32, so registered test metrics
    scored so are those of the model users get (bf16 autocast changes predictions near a tie)."""
    net.to(device, memory_format=torch.channels_last)
    amp_dtype = resolve_amp_dtype(precision, device)
    return evaluate_images(net, images, labels, class_names, prefix, amp_dtype, tta, batch_size, temperature)


def evaluate_images(net, images: np.ndarray, labels: np.ndarray, class_names: list[str], prefix: str, amp_dtype,
                    tta=False, batch_size=EVAL_BATCH, temperature: float = 1.0) -> EvaluationReport:
    """Score `net` (on its device) on uint8 images: `prefix`_* metrics, per-class table, report, confusion.
    `temperature` divides the logits, as the served model does (pipeline.evaluate.calibration); argmax unchanged."""
    device = next(net.parameters()).device
    logits = predict_logits(net, torch.from_numpy(images).to(device), amp_dtype, tta, batch_size)
    probs = torch.softmax(logits / temperature, 1).cpu().numpy()
    pred = probs.argmax(1)
    metrics = summary_metrics(labels, pred, len(class_names), prefix)
    table = per_class_table(labels, pred, class_names)
    ap = average_precision(labels, probs)
    table["average_precision"] = ap  # the CSV holds it for any number of classes
    metrics[f"{prefix}_average_precision_macro"] = float(np.nanmean(ap))  # over the classes present
    if len(class_names) <= MAX_PER_CLASS_METRICS:
        keys = metric_keys(class_names)
        for row in table.itertuples():
            for m in ("precision", "recall", "f1"):
                metrics[f"{prefix}_{m}_{keys[row[1]]}"] = float(getattr(row, m))
        metrics.update({f"{prefix}_average_precision_{keys[name]}": float(v)
                        for name, v in zip(class_names, ap) if not np.isnan(v)})
    cm = confusion(labels, pred, len(class_names))
    return EvaluationReport(metrics, table, report_text(labels, pred, class_names), cm, probs, labels, ap)

