"""The model that params.model names: the network, its input normalization, its task heads.

Every model takes [0, 1] pixels at the data's size: `Normalized` resizes them to what the
network wants and normalizes them, inside the model, so the saved and logged model needs no
preprocessing of its own. With auxiliary tasks on (params.tasks), tasks.MultiTask adds their heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.errors import StageError

# efficientnet_lite, small, timm_models, torchvision_models: the definitions registry.py's
# entries build from. registry.py imports none of them (params.py reads it); importing them here
# makes them DVC deps of train and evaluate (tests/test_layout.py checks it).
from stages.networks import (
    efficientnet_lite,  # noqa: F401
    freeze,
    registry,
    small,  # noqa: F401
    tasks,
    timm_models,  # noqa: F401
    torchvision_models,  # noqa: F401
)


class Normalized(nn.Module):
    """Resize to `size` (when given), (x - mean) / std per channel, then the network."""

    def __init__(
        self, net: nn.Module, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), size: int | None = None
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.size = size
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(prepare(x, self.mean, self.std, self.size))


def prepare(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int | None):
    """What Normalized does before its network: resize to `size` (when given), normalize."""
    if size and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - mean) / std


def build_model(params, num_classes: int, image_size: int, mean_std=None) -> nn.Module:
    """The network that params.model names, randomly initialized (train loads pretrained weights
    into `network(model)`); wrapped in Normalized when it has to resize or normalize, and in
    tasks.MultiTask when an auxiliary task is on."""
    model = _build_one(params, num_classes, image_size, mean_std)
    sizes = tasks.output_sizes(params.tasks)
    if not sizes:
        return model
    head = network(model).get_submodule(registry.network(params.model.name).head)
    return tasks.MultiTask(
        model,
        head,
        sizes,
        tasks.active(params.tasks),
        learn_weights=params.tasks.weighting == "uncertainty",
    )


def _build_one(params, num_classes: int, image_size: int, mean_std=None) -> nn.Module:
    m = params.model
    entry = registry.network(m.name)
    size = m.input_size or image_size
    low, high, why = entry.input_sizes(m)
    if not low <= size <= high:  # params.py checks model.input_size; this, the data's own size
        raise StageError(
            f"model.name = {m.name} takes {low}…{high} pixels ({why}); the data's images are "
            f"{size} pixels: set model.input_size (or data.image_size)"
        )
    net = entry.build(m, num_classes)
    if m.freeze_bn:
        freeze.freeze_batch_norm(net)
    if entry.mean_std is not None:  # normalized as its weights expect
        return Normalized(net, *entry.mean_std, size=size)
    if params.data.normalize == "dataset":
        return Normalized(
            net, *(mean_std or ((0.0,) * 3, (1.0,) * 3)), size=size if size != image_size else None
        )
    if size != image_size:
        return Normalized(net, size=size)
    return net


def network(model: nn.Module) -> nn.Module:
    """The network inside the MultiTask and Normalized wrappers, whose parameter names the
    weights files use."""
    model = tasks.unwrap(model)
    return model.net if isinstance(model, Normalized) else model


def channel_mean_std(images: torch.Tensor, chunk: int = 10_000):
    """Per-channel mean and std of uint8 images on the [0, 1] scale, without a float copy of all."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean**2).clamp(min=1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
