"""airnet: the network of airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU",
after David Page's ResNet-9 work), written for this pipeline's five stages.

    stem    2x2 conv 3 -> 24 with bias, no padding, its weight set from the training data by patch
            whitening (initialise_from_data) and then fixed; GELU
    layer1  conv group 24 -> 64     (a group: conv3x3, max-pool 2, BN, GELU, conv3x3, BN, GELU)
    layer2  conv group 64 -> 256
    layer3  the first half of conv group 256 -> 256 (conv, pool, BN, GELU)
    layer4  its second half (conv, BN, GELU)
    head    global max pool, fc = Sequential(Dropout, Linear(256, classes, no bias)), logits x 1/9

BatchNorm: eps 1e-12, momentum 0.4 (airbench's 0.6 in its convention), scale fixed at 1, bias trained
at norm_lr_scale x the lr. The fixed parameters are named by fixed_parameters() from the module
structure, not marked on the Parameter objects, so they stay fixed through freeze() and through
torch-pruning, which builds new Parameters for the layers it prunes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.loader import normalize

WIDTHS = (64, 256, 256)
WHITEN_WIDTH = 24  # 12 eigenvectors of the 2x2x3 patch covariance and their negatives
WHITEN_EPS = 5e-4
WHITEN_IMAGES = 5000  # training images whose patches estimate the covariance
LOGIT_SCALE = 1 / 9
BN_MOMENTUM = 0.4
BN_EPS = 1e-12


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 conv, padding 1, no bias; default init, then identity on the first in_channels filters (each
    passes one input channel through at first, as airbench initialises). A plain Conv2d, so that pruned
    layers are recorded and rebuilt as any other (models.layer_shapes)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)  # weight 1 (init), fixed: see AirNet


def _first_half(c_in: int, c_out: int) -> nn.Sequential:
    # ceil_mode: 8 px images (as the tests use) still reach the last group at 1 px instead of 0.
    return nn.Sequential(_conv(c_in, c_out), nn.MaxPool2d(2, ceil_mode=True), _norm(c_out), nn.GELU())


def _second_half(channels: int) -> nn.Sequential:
    return nn.Sequential(_conv(channels, channels), _norm(channels), nn.GELU())


class AirNet(nn.Module):
    norm_lr_scale = 64.0  # BatchNorm biases train at 64 x the lr, with weight decay / 64 (airbench's bias_scaler)

    def __init__(self, num_classes: int, dropout: float = 0.0, widths: tuple[int, int, int] = WIDTHS):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, WHITEN_WIDTH, 2, padding=0, bias=True), nn.GELU())
        nn.init.zeros_(self.stem[0].bias)
        self.layer1 = nn.Sequential(_first_half(WHITEN_WIDTH, w1), _second_half(w1))
        self.layer2 = nn.Sequential(_first_half(w1, w2), _second_half(w2))
        self.layer3 = _first_half(w2, w3)
        self.layer4 = _second_half(w3)
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(w3, num_classes, bias=False))
        for p in self.fixed_parameters():  # (freeze() and fit() set this again: pruning makes new Parameters)
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1)) * LOGIT_SCALE

    def fixed_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that never train: the whitening conv's weight and every BatchNorm's scale."""
        yield self.stem[0].weight
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight is not None:
                yield module.weight

    def norm_parameters(self) -> Iterator[nn.Parameter]:
        """The BatchNorm biases: what trains at norm_lr_scale x the lr."""
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d) and module.bias is not None:
                yield module.bias

    @torch.no_grad()
    def initialise_from_data(self, images: torch.Tensor) -> None:
        """Set the stem's weights to whiten 2x2 patches of `images` (uint8 NHWC, the first WHITEN_IMAGES
        used): filters = the eigenvectors of the patches' (uncentred) covariance scaled by
        1/sqrt(eigenvalue + WHITEN_EPS), and their negatives, so that GELU passes both signs."""
        conv = self.stem[0]
        x = normalize(images[:WHITEN_IMAGES].to(conv.weight.device)).float()
        k = conv.kernel_size[0]
        # (N, 3, H, W) -> every k x k patch as a row of 3*k*k values, in the conv weight's (c, i, j) order.
        patches = F.unfold(x, k).transpose(1, 2).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + WHITEN_EPS)).T.flip(0)  # largest first
        n = conv.out_channels // 2
        weight = torch.cat([filters[:n], -filters[:n]]).reshape(conv.weight.shape)
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias.zero_()
