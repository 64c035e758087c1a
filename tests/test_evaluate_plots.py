"""evaluate's precision-recall curves, average-precision metrics and misclassified-images grid."""

import io

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import label_binarize

from pipeline.data.store import load_dataset
from pipeline.evaluate.plots import misclassified_grid, pyplot
from pipeline.model.models import ImageClassifier, create_model
from pipeline.track import references


def _png(fig_or_path) -> Image.Image:
    if isinstance(fig_or_path, str):
        image = Image.open(fig_or_path)
    else:
        buf = io.BytesIO()
        fig_or_path.savefig(buf, format="png")
        pyplot().close(fig_or_path)
        image = Image.open(buf)
    image.load()
    assert image.format == "PNG"
    return image


def test_evaluate_logs_pr_curves_and_misclassified_grid_as_pngs(trained):
    for name in ("precision_recall", "misclassified"):
        path = mlflow.artifacts.download_artifacts(f"runs:/{trained.evaluate}/evaluation/test_{name}.png")
        assert min(_png(path).size) > 100


def test_average_precision_equals_sklearn_on_independent_predictions(trained):
    ds, _ = load_dataset(mlflow.artifacts.download_artifacts(f"runs:/{trained.prepare}/dataset"), ("test",))
    test = ds.splits["test"]
    state, meta = references.load_model_ref(trained.finetune)
    net = create_model(meta["arch"], meta["num_classes"], meta["dropout"])
    net.load_state_dict(state)
    model = ImageClassifier(net, meta["class_names"], meta["image_size"]).eval()
    temperature = meta.get("temperature") or 1.0  # the served probabilities, calibrated by the run's temperature
    with torch.no_grad():  # the exported forward: uint8 images in, logits out (not evaluate's batching path)
        probs = torch.softmax(model(torch.from_numpy(test.images)).float() / temperature, 1).numpy()
    onehot = label_binarize(test.labels, classes=list(range(10)))
    m = mlflow.get_run(trained.evaluate).data.metrics
    assert m["test_average_precision_macro"] == pytest.approx(
        average_precision_score(onehot, probs, average="macro"), abs=1e-6
    )
    per_class = average_precision_score(onehot, probs, average=None)
    assert [m[f"test_average_precision_{c}"] for c in range(10)] == pytest.approx(list(per_class), abs=1e-6)


def test_grid_shows_the_most_confident_mistakes_first():
    images = np.zeros((5, 8, 8, 3), np.uint8)
    labels = np.array([0, 1, 0, 1, 0])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.4, 0.6]])  # 2, 3, 4 are wrong
    fig = misclassified_grid(images, labels, probs, ["cat", "dog"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true: dog\npred: cat (0.80)", "true: cat\npred: dog (0.70)", "true: cat\npred: dog (0.60)"]
    _png(fig)


def test_grid_with_no_mistakes_says_so():
    """Documented choice: the artifact always exists; with no mistake it is one line of text."""
    labels = np.array([0, 1, 1])
    fig = misclassified_grid(np.zeros((3, 8, 8, 3), np.uint8), labels, np.eye(2)[labels], ["a", "b"])
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["no misclassified images: all 3 correct"]
    _png(fig)
