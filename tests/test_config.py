import math

import pytest

from pipeline.config import EvaluateConfig, PrepareConfig, TrainConfig
from pipeline.errors import PipelineError


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"lr": 0}, "lr=0 must be a positive"),
        ({"lr": -0.1}, "lr=-0.1 must be a positive"),
        ({"lr": math.nan}, "lr=nan must be a positive"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
        ({"frozen_layers": 6, "pretrained": "x"}, "frozen_layers=6 is out of range; use 0"),
        ({"frozen_layers": -1, "pretrained": "x"}, "frozen_layers=-1 is out of range"),
        ({"arch": "vgg16"}, "arch='vgg16' is not supported; use one of: resnet18"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not supported"),
        ({"precision": "fp16"}, "precision='fp16' is not supported"),
        ({"label_smoothing": 1.0}, "label_smoothing=1.0 is out of range"),
        ({"arch": "auto"}, "finetune needs pretrained: a pretrain run id"),
        ({"arch": "resnet9", "weights": "imagenet"}, "resnet9 has no ImageNet weights"),
    ],
)
def test_train_config_rejects_bad_values_with_the_fix(kwargs, fragment):
    with pytest.raises(PipelineError, match=None) as info:
        TrainConfig(data="d", **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"val_fraction": 1.0}, "val_fraction=1.0 is out of range; use a fraction in [0, 1)"),
        ({"test_fraction": -0.1}, "test_fraction=-0.1 is out of range"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
        ({"image_size": 4}, "image_size=4 is too small"),
        ({"samples_per_class": -1}, "samples_per_class=-1 must be >= 0"),
        ({"on_bad_image": "ignore"}, "on_bad_image='ignore' is not supported"),
    ],
)
def test_prepare_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises(PipelineError) as info:
        PrepareConfig(**kwargs)
    assert fragment in str(info.value)


def test_evaluate_config_needs_model_and_data():
    with pytest.raises(PipelineError, match="model is empty"):
        EvaluateConfig(data="x")
    with pytest.raises(PipelineError, match="split='holdout' is not supported"):
        EvaluateConfig(model="m", data="d", split="holdout")


def test_defaults_are_valid_and_parse_class_subset():
    assert PrepareConfig(classes=" cat, dog ,").class_subset == ["cat", "dog"]
    assert TrainConfig().arch == "resnet18"
