"""Data: sources -> ImageSet splits (uint8 NHWC + int64 labels + class names) -> stored artifact,
and the batches training and scoring draw from them (loader).

May import: pipeline.config and the shared top-level modules (errors, distributed); never mlflow or
optuna, nor any other pipeline package.
"""

from pipeline.data.imageset import DatasetSplits, ImageSet

__all__ = ["DatasetSplits", "ImageSet"]
