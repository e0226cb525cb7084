"""Every network by its model.name: its class, where its classifier head is, its blocks.

Our own networks describe themselves beside their definitions (small.py: net, cnn, resnet9;
efficientnet_lite.py: efficientnet_lite0), with a `HEAD` name and a `blocks()` method. The
ImageNet backbones of torchvision (resnet18, mobilenet_v3_small, efficientnet_b0) are described
here, in TORCHVISION, since their code is torchvision's. The blocks, without the head and in
forward order, are what model.freeze = all_but_last_<N> cuts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from stages.networks import efficientnet_lite, small

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet weights expect, on [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Torchvision:
    head: str  # the classifier layer (a Linear), by its name in the state dict
    blocks: Callable[[nn.Module], list[list[nn.Module]]]  # without the head, in forward order


TORCHVISION = {
    "resnet18": Torchvision(
        "fc",
        lambda net: [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]],
    ),
    "mobilenet_v3_small": Torchvision(
        "classifier.3", lambda net: [[m] for m in net.features] + [[net.classifier[0]]]
    ),
    "efficientnet_b0": Torchvision("classifier.1", lambda net: [[m] for m in net.features]),
}


OWN = {
    "net": small.Net,
    "cnn": small.CNN,
    "resnet9": small.ResNet9,
    "efficientnet_lite0": efficientnet_lite.EfficientNetLite0,
}


def head_name(name: str) -> str:
    """The classifier layer of network `name`, by its name in the state dict."""
    return OWN[name].HEAD if name in OWN else TORCHVISION[name].head


def blocks(net: nn.Module, name: str) -> list[list[nn.Module]]:
    """The network without its head, in forward order, as freezable blocks."""
    return net.blocks() if name in OWN else TORCHVISION[name].blocks(net)


def replace_head(net: nn.Module, name: str, num_classes: int) -> None:
    """A new classifier for `num_classes`, in place of the ImageNet one."""
    parent, _, attr = head_name(name).rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    old = owner.get_submodule(attr)
    setattr(owner, attr, nn.Linear(old.in_features, num_classes))


def imagenet_architecture(name: str) -> nn.Module:
    """The network as its ImageNet weights were trained: 1,000 classes, random weights."""
    if name == "efficientnet_lite0":
        return efficientnet_lite.EfficientNetLite0()
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def input_mean_std(name: str) -> tuple[tuple, tuple]:
    """The per-channel normalization the backbone's ImageNet weights expect, on [0, 1] pixels."""
    if name == "efficientnet_lite0":
        return efficientnet_lite.MEAN, efficientnet_lite.STD
    return IMAGENET_MEAN, IMAGENET_STD
