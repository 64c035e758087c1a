"""Networks for small images, their stages, and freezing.

Every network exposes the same attributes, so stage-wise freezing is one rule for all:
conv1 + bn1 (the stem), layer1 .. layer4, and fc = Sequential(Dropout, Linear) (the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.data.loader import prepare_input
from pipeline.errors import PipelineError

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The DAWNBench/airbench-style ResNet-9 for 32x32 images: fast to train, ~94% on CIFAR-10."""

    def __init__(self, num_classes: int, dropout: float = 0.0, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = _conv_bn(w, 2 * w, pool=True)
        self.layer2 = Residual(2 * w)
        self.layer3 = _conv_bn(2 * w, 4 * w, pool=True)
        self.layer4 = nn.Sequential(_conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w))
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


def load_imagenet_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights from the torch hub cache ($TORCH_HOME), downloading if absent."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except OSError as exc:  # URLError and friends: offline with no cached file
        fname = weights.url.rsplit("/", 1)[-1]
        raise PipelineError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({exc}); put "
            f"{fname} into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch) or use weights=none"
        ) from exc


def _small_image_resnet(arch: str, num_classes: int, dropout: float, weights: str) -> nn.Module:
    net = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        net.load_state_dict(load_imagenet_state_dict(arch))
    # Small-image stem: 3x3 stride-1 conv, no max-pool, so 32x32 inputs keep their resolution.
    old = net.conv1.weight.data
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    if weights == "imagenet":
        net.conv1.weight.data.copy_(old[:, :, 2:5, 2:5])  # the centre of the ImageNet 7x7 kernels
    net.maxpool = nn.Identity()
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.fc.in_features, num_classes))
    return net


def create_model(arch: str, num_classes: int, dropout: float = 0.0, weights: str = "none") -> nn.Module:
    if arch == "resnet9":
        return ResNet9(num_classes, dropout)
    if arch in TORCHVISION_ARCHS:
        return _small_image_resnet(arch, num_classes, dropout, weights)
    raise PipelineError(f"unknown arch {arch!r}; use one of resnet9, {', '.join(TORCHVISION_ARCHS)}")


def stages(model: nn.Module) -> list[list[nn.Module]]:
    """The config.NUM_STAGES freezable stages in order: stem, layer1, layer2, layer3, layer4."""
    return [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3], [model.layer4]]


def freeze(model: nn.Module, frozen_layers: int) -> None:
    """Freeze the first `frozen_layers` stages (0 = none, config.NUM_STAGES = all but the head).

    requires_grad is the one record of what is frozen: set_train_mode reads it back.
    """
    for i, stage in enumerate(stages(model)):
        for module in stage:
            for p in module.parameters():
                p.requires_grad_(i >= frozen_layers)


def frozen_stages(model: nn.Module) -> list[list[nn.Module]]:
    """The stages with parameters none of which is trainable (what freeze() left frozen)."""
    def is_frozen(stage: list[nn.Module]) -> bool:
        params = [p for module in stage for p in module.parameters()]
        return bool(params) and not any(p.requires_grad for p in params)

    return [stage for stage in stages(model) if is_frozen(stage)]


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that frozen stages stay in eval mode, so their BatchNorm keeps its
    running statistics (they would otherwise drift towards the new data while the weights stay)."""
    model.train()
    for stage in frozen_stages(model):
        for module in stage:
            module.eval()


def replace_head(model: nn.Module, num_classes: int) -> None:
    linear = model.fc[-1]
    model.fc[-1] = nn.Linear(linear.in_features, num_classes)


def build_logged_net(meta: dict, state: dict) -> nn.Module:
    """The network of a logged model, from its metadata (arch, num_classes, dropout) and state dict."""
    net = create_model(meta["arch"], meta["num_classes"], meta.get("dropout", 0.0))
    net.load_state_dict(state)
    return net


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ImageClassifier(nn.Module):
    """What gets exported: uint8 images (N, H, W, 3) in, class logits out.

    Resizing and normalization live inside, so a user feeds the pixels they have.
    """

    def __init__(self, net: nn.Module, class_names: list[str], image_size: int):
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(prepare_input(images, self.image_size))
