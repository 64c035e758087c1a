"""Data: sources -> ImageSet splits (uint8 NHWC + int64 labels + class names) -> stored artifact."""

from pipeline.data.imageset import DatasetSplits, ImageSet

__all__ = ["DatasetSplits", "ImageSet"]
