"""Figures the evaluate step logs: confusion matrix, precision-recall curves, misclassified images;
all drawn headless (Agg)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import precision_recall_curve

MAX_GRID_IMAGES = 25
MAX_LEGEND_CLASSES = 20  # beyond this many curves a legend hides the plot
MAX_ANNOTATED_CLASSES = 30  # beyond this many classes the counts in the confusion matrix cells are unreadable


def pyplot():
    """matplotlib.pyplot on the Agg backend: no display on servers or CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def misclassified_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                       limit: int = MAX_GRID_IMAGES):
    """The `limit` misclassified images the model was most sure about, each titled with its true
    class, the predicted class and that prediction's probability. With no mistake at all the
    figure is one line of text saying so (the artifact always exists)."""
    plt = pyplot()
    pred = probs.argmax(1)
    confidence = probs[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    if not len(shown):
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified images: all {len(labels)} correct", ha="center", va="center")
        return fig
    cols = min(5, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"true: {class_names[labels[i]]}\npred: {class_names[pred[i]]} ({confidence[i]:.2f})", fontsize=8)
    which = f"all {len(wrong)}" if len(shown) == len(wrong) else f"the {len(shown)} most confident of {len(wrong)}"
    fig.suptitle(f"{which} misclassified of {len(labels)} images, most confident first", fontsize=10)
    fig.tight_layout()
    return fig


def precision_recall_figure(labels: np.ndarray, probs: np.ndarray, class_names: list[str], ap: np.ndarray):
    """One-vs-rest precision-recall curve per class, its average precision in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for c, name in enumerate(class_names):
        if np.isnan(ap[c]):
            continue  # no true images of this class: no curve
        precision, recall, _ = precision_recall_curve(labels == c, probs[:, c])
        ax.plot(recall, precision, drawstyle="steps-post", linewidth=1, label=f"{name} (AP {ap[c]:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall per class (one vs rest); macro AP {np.nanmean(ap):.3f}")
    if len(class_names) <= MAX_LEGEND_CLASSES:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, class_names: list[str]):
    """The confusion matrix as a heat map, true class by row; counts in the cells up to
    MAX_ANNOTATED_CLASSES classes."""
    plt = pyplot()
    n = len(class_names)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= MAX_ANNOTATED_CLASSES:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if cm[i, j] > threshold else "black"
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8, color=color)
    fig.tight_layout()
    return fig
