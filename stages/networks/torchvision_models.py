"""torchvision's ImageNet backbones (resnet18, mobilenet_v3_small, efficientnet_b0): their code is
torchvision's, so what the registry needs to know of them is here: building one with a new head,
its blocks in forward order, and its forward pass as a sequence of its modules."""

from __future__ import annotations

import torch.nn as nn


def build(name: str, head: str, num_classes: int) -> nn.Module:
    """The network as its ImageNet weights were trained (random weights), with a new classifier
    for `num_classes` in place of the ImageNet one."""
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    parent, _, attr = head.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    setattr(owner, attr, nn.Linear(owner.get_submodule(attr).in_features, num_classes))
    return net


def blocks(net: nn.Module, name: str) -> list[list[nn.Module]]:
    """Without the head, in forward order: resnet18's stem and four stages; the others' features."""
    if name == "resnet18":
        return [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
    if name == "mobilenet_v3_small":
        return [[m] for m in net.features] + [[net.classifier[0]]]
    return [[m] for m in net.features]  # efficientnet_b0


def layers(net: nn.Module, name: str) -> list[nn.Module]:
    """forward() as a sequence of the network's modules: nn.Sequential(*layers(net)) is net."""
    if name == "resnet18":
        return [
            *(net.conv1, net.bn1, net.relu, net.maxpool),
            *(net.layer1, net.layer2, net.layer3, net.layer4),
            *(net.avgpool, nn.Flatten(), net.fc),
        ]
    return [*net.features, net.avgpool, nn.Flatten(), *net.classifier]
