"""Networks for small images, their stages, and freezing.

Every network exposes the same five stages and a head, so stage-wise freezing is one rule for all:
the stem (conv1 + bn1 on the ResNets, `stem` on the others), layer1 .. layer4, and the head `fc`,
a Sequential whose last module is the class Linear. Each stage of the small-image nets ends at the
resolution of the same ResNet-18 stage (32 px in: 32, 32, 16, 8, 4; airnet: 31, 16, 8, 4, 4).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.data.loader import prepare_input
from pipeline.errors import PipelineError
from pipeline.model.airnet import AirNet

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
MOBILENET_ARCHS = ("mobilenet_v3_small", "mobilenet_v3_large")
VGG_ARCHS = ("vgg11_bn",)
ALL_ARCHS = ("resnet9", *TORCHVISION_ARCHS, *MOBILENET_ARCHS, *VGG_ARCHS, "airnet")
# torchvision's MobileNetV3 `features` split into stem, layer1..layer4 (slices of block indices):
# each layer ends where the ImageNet net's resolution halves next.
MOBILENET_STAGES = {
    "mobilenet_v3_small": (slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 9), slice(9, 13)),
    "mobilenet_v3_large": (slice(0, 1), slice(1, 4), slice(4, 7), slice(7, 13), slice(13, 17)),
}
# vgg11_bn `features`: stem = conv64, layer1 = conv128, layer2..4 = pool + two convs. The first and
# last max-pools are dropped (as the ResNets drop stride and max-pool), so 8 px images still fit.
VGG_STAGES = (slice(0, 3), slice(4, 7), slice(7, 14), slice(14, 21), slice(21, 28))


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
    """David Page's DAWNBench ResNet-9 for 32x32 images: three conv-BN-ReLU stages with max-pool and two
    residual blocks, a global max-pool, and the class logits scaled by LOGIT_SCALE."""

    # Page scales the logits by 1/8: the max-pooled 512 features make them large from the first
    # steps, and unscaled the training loss started at 8-13 and stalled near 21% (JPEG CIFAR-10, lr 0.05).
    LOGIT_SCALE = 0.125

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
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1)) * self.LOGIT_SCALE


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


class StagedNet(nn.Module):
    """stem -> layer1 .. layer4 -> global average pool -> fc: a torchvision net cut into the five stages."""

    def __init__(self, parts: list[nn.Module], fc: nn.Sequential):
        super().__init__()
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = parts
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _torchvision_net(arch: str, weights: str) -> nn.Module:
    net = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        net.load_state_dict(load_imagenet_state_dict(arch))
    return net


def _unstride(block: nn.Module) -> None:
    """Make the stride-2 convolutions of a block stride 1 (the block's weights stay valid)."""
    for conv in block.modules():
        if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
            conv.stride = (1, 1)


def _small_image_mobilenet(arch: str, num_classes: int, dropout: float, weights: str) -> StagedNet:
    net = _torchvision_net(arch, weights)
    # Small-image stem as for the ResNets: the stem and the first stride-2 block stride 1, overall stride 8.
    first_strided = 1 if arch == "mobilenet_v3_small" else 2
    _unstride(net.features[0])
    _unstride(net.features[first_strided])
    parts = [nn.Sequential(*net.features[s]) for s in MOBILENET_STAGES[arch]]
    hidden = net.classifier[0]  # the 1024/1280-wide hidden layer stays: MobileNetV3 leans on it
    fc = nn.Sequential(hidden, nn.Hardswish(), nn.Dropout(dropout), nn.Linear(hidden.out_features, num_classes))
    return StagedNet(parts, fc)


def _vgg_features(arch: str, weights: str) -> nn.Sequential:
    """vgg11_bn's convolutional part alone: building torchvision's whole net would first initialise
    its 120M-parameter classifier, several seconds on a small CPU, only to throw it away."""
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"], batch_norm=True)
    if weights == "imagenet":
        state = load_imagenet_state_dict(arch)
        prefix = "features."
        features.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return features


def _small_image_vgg(arch: str, num_classes: int, dropout: float, weights: str) -> StagedNet:
    features = _vgg_features(arch, weights)
    parts = [nn.Sequential(*features[s]) for s in VGG_STAGES]
    # The 7x7x512 -> 4096 -> 4096 ImageNet classifier (120M parameters) makes no sense at 32 px:
    # one Linear on the pooled 512 features, as CIFAR VGGs do.
    return StagedNet(parts, nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes)))


def create_model(arch: str, num_classes: int, dropout: float = 0.0, weights: str = "none") -> nn.Module:
    if arch == "resnet9":
        return ResNet9(num_classes, dropout)
    if arch == "airnet":
        return AirNet(num_classes, dropout)
    if arch in TORCHVISION_ARCHS:
        return _small_image_resnet(arch, num_classes, dropout, weights)
    if arch in MOBILENET_ARCHS:
        return _small_image_mobilenet(arch, num_classes, dropout, weights)
    if arch in VGG_ARCHS:
        return _small_image_vgg(arch, num_classes, dropout, weights)
    raise PipelineError(f"unknown arch {arch!r}; use one of {', '.join(ALL_ARCHS)}")


def stages(model: nn.Module) -> list[list[nn.Module]]:
    """The config.NUM_STAGES freezable stages in order: stem, layer1, layer2, layer3, layer4."""
    stem = [model.stem] if isinstance(model, (StagedNet, AirNet)) else [model.conv1, model.bn1]
    return [stem, [model.layer1], [model.layer2], [model.layer3], [model.layer4]]


def freeze(model: nn.Module, frozen_layers: int) -> None:
    """Freeze the first `frozen_layers` stages (0 = none, config.NUM_STAGES = all but the head).

    requires_grad is the one record of what is frozen: set_train_mode reads it back. The net's fixed
    parameters (fixed_parameters: airnet's whitening and BatchNorm scales) stay untrainable at any depth.
    """
    for i, stage in enumerate(stages(model)):
        for module in stage:
            for p in module.parameters():
                p.requires_grad_(i >= frozen_layers)
    hold_fixed(model)


def fixed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the net never trains, found from its structure each time (so pruned layers'
    new Parameters are found too); none for the nets without a fixed_parameters() method."""
    return list(model.fixed_parameters()) if hasattr(model, "fixed_parameters") else []


def hold_fixed(model: nn.Module) -> None:
    """Make the net's fixed parameters untrainable again: freeze() does, and fit() before building its
    optimizer, since torch-pruning replaces the Parameters of the layers it prunes."""
    for p in fixed_parameters(model):
        p.requires_grad_(False)


def norm_parameters(model: nn.Module) -> tuple[list[nn.Parameter], float]:
    """(the parameters the net trains at a scaled lr, the scale): airnet's BatchNorm biases at 64 x;
    ([], 1.0) for the other nets."""
    if not hasattr(model, "norm_parameters"):
        return [], 1.0
    return list(model.norm_parameters()), float(model.norm_lr_scale)


def initialise_from_data(model: nn.Module, train_images: np.ndarray) -> None:
    """What a net from scratch sets from its training images (uint8 NHWC) before training: airnet's
    patch-whitening stem. Nothing for the other nets."""
    if hasattr(model, "initialise_from_data"):
        model.initialise_from_data(torch.from_numpy(np.asarray(train_images)))


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


PRUNED_LAYERS = "pruned_layers"  # model_meta.json key: {layer name: its shape} where pruning changed it
# The constructor arguments that define each prunable layer's shape (the rest is copied from the unpruned layer).
SHAPE_FIELDS = {nn.Conv2d: ("in_channels", "out_channels", "groups"), nn.BatchNorm2d: ("num_features",),
                nn.Linear: ("in_features", "out_features")}


def layer_shapes(net: nn.Module) -> dict[str, dict[str, int]]:
    """{module name: {"type": ..., shape fields}} for every Conv2d, BatchNorm2d and Linear of `net`."""
    shapes = {}
    for name, module in net.named_modules():
        kind = type(module)
        if kind in SHAPE_FIELDS:
            shapes[name] = {"type": kind.__name__, **{f: getattr(module, f) for f in SHAPE_FIELDS[kind]}}
    return shapes


def pruned_layers(net: nn.Module, arch: str, num_classes: int) -> dict[str, dict[str, int]]:
    """The layers of `net` whose shape differs from create_model(arch, num_classes)'s: {} for an unpruned net.

    What a logged model's metadata records, so that its network is rebuilt without unpickling a module."""
    reference = layer_shapes(create_model(arch, num_classes))
    return {name: shape for name, shape in layer_shapes(net).items() if reference.get(name) != shape}


def _resized(module: nn.Module, shape: dict[str, int]) -> nn.Module:
    """A fresh layer like `module` (kernel, stride, bias, eps...) with the channel counts in `shape`."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(shape["in_channels"], shape["out_channels"], module.kernel_size, module.stride,
                         module.padding, module.dilation, shape["groups"], module.bias is not None, module.padding_mode)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape["num_features"], module.eps, module.momentum, module.affine,
                              module.track_running_stats)
    return nn.Linear(shape["in_features"], shape["out_features"], module.bias is not None)


def apply_layer_shapes(net: nn.Module, shapes: dict[str, dict[str, int]]) -> None:
    """Replace the named layers of an unpruned `net` by ones of the recorded shapes (a pruned net's)."""
    for name, shape in shapes.items():
        module = net.get_submodule(name)
        if type(module).__name__ != shape["type"]:
            raise PipelineError(f"pruned layer {name!r} is a {shape['type']} in the model's metadata but a "
                                f"{type(module).__name__} in {type(net).__name__}; the model was logged by other code")
        parent_name, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent_name), attr, _resized(module, shape))


def build_logged_net(meta: dict, state: dict) -> nn.Module:
    """The network of a logged model, from its metadata (arch, num_classes, dropout, pruned_layers)
    and state dict: a pruned model's layers are rebuilt at their recorded shapes before loading."""
    net = create_model(meta["arch"], meta["num_classes"], meta.get("dropout", 0.0))
    apply_layer_shapes(net, meta.get(PRUNED_LAYERS, {}))
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
