"""The logged model as users call it: an MLflow pyfunc from uint8 images to class names and probabilities.

`mlflow.pyfunc.load_model`, `mlflow models predict` and `mlflow models serve` all go through
`ImageClassifierModel.predict`. The network is rebuilt from a plain state dict (loaded with
`weights_only=True`), so loading the model unpickles no torch module.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.evaluate.calibration import temperature_of
from pipeline.evaluate.predictions import PROB_PREFIX
from pipeline.model.models import ImageClassifier, build_logged_net

WEIGHTS_ARTIFACT = "weights"
META_ARTIFACT = "meta"
PREDICT_BATCH = 256  # images per forward pass at most
# Input pixels (height x width, summed over the batch) per forward pass: bounds the float copy the
# resize makes (12 bytes per pixel) whatever the images' size; 16M pixels = 192 MB.
PREDICT_PIXELS = 16 * 2**20


def load_classifier(weights_path: str, meta: dict) -> ImageClassifier:
    net = build_logged_net(meta, torch.load(weights_path, map_location="cpu", weights_only=True))
    return ImageClassifier(net, meta["class_names"], meta["image_size"]).eval()


def as_image_batch(images) -> np.ndarray:
    """(N, H, W, 3) uint8 from what a caller may send: one image, a batch, or nested lists."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise PipelineError(f"expected uint8 RGB images shaped (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise PipelineError("pixel values must be in 0-255 (uint8 RGB); scale [0, 1] floats by 255 first")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)  # torch.from_numpy refuses views with negative strides (img[..., ::-1])


def read_images(paths: list[str], size: int = 0) -> np.ndarray:
    """Image files -> one uint8 (N, H, W, 3) batch, each resized to size x size (0 = the first image's size)."""
    from PIL import Image, UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise PipelineError(f"cannot read image {path!r} ({exc}); pass JPEG/PNG/... files") from exc
        shape = (size, size) if size else (batch[0].shape[1], batch[0].shape[0]) if batch else rgb.size
        if rgb.size != shape:
            rgb = rgb.resize(shape, Image.BILINEAR)
        batch.append(np.asarray(rgb, np.uint8))
    return np.stack(batch)


def predict_batch_rows(height: int, width: int) -> int:
    """Images per forward pass for images of height x width: PREDICT_PIXELS' worth, 1 to PREDICT_BATCH."""
    return max(1, min(PREDICT_BATCH, PREDICT_PIXELS // max(1, height * width)))


def request_json(images: np.ndarray) -> str:
    """The body `mlflow models serve` expects for a tensor input: {"inputs": [...]}."""
    return json.dumps({"inputs": images.tolist()}, separators=(",", ":"))


def predictions_frame(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per image: class_name, confidence, then prob_<class> for every class."""
    best = probs.argmax(1)
    frame = pd.DataFrame(
        {"class_name": [class_names[i] for i in best], "confidence": probs[np.arange(len(best)), best]}
    )
    probs_frame = pd.DataFrame(probs, columns=[PROB_PREFIX + c for c in class_names])
    return pd.concat([frame, probs_frame], axis=1)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """uint8 images (N, H, W, 3), any size (resized inside) -> a DataFrame of class names and probabilities."""

    # MLflow's type-hint validation cannot express a uint8 image tensor (it warns on every import
    # without hints); the logged signature and as_image_batch validate the input instead.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        with open(context.artifacts[META_ARTIFACT]) as f:
            self.meta = json.load(f)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.classifier = load_classifier(context.artifacts[WEIGHTS_ARTIFACT], self.meta).to(self.device)
        self.temperature = temperature_of(self.meta)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = as_image_batch(model_input)
        rows = predict_batch_rows(*images.shape[1:3])
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), rows):
                # uint8 to the device; ImageClassifier resizes each batch before normalizing it.
                batch = torch.from_numpy(images[start : start + rows]).to(self.device)
                logits = self.classifier(batch).float() / self.temperature  # calibrated: see temperature_of
                chunks.append(torch.softmax(logits, 1).cpu().numpy())
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(self.meta["class_names"])), np.float32)
        return predictions_frame(probs, self.meta["class_names"])
