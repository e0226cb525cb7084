"""train.feature_cache: the frozen first part of a network, computed once per image.

With model.freeze = backbone (a linear probe) or all_but_last_<N>, the frozen blocks give every
image the same output in every epoch, as long as nothing random reaches them: no online
augmentation or mixing of the inputs, no batch norm that adapts in training mode and no dropout
inside them (model.freeze_bn fixes the batch norm and, by freeze.hold_frozen_in_eval, runs frozen
blocks as in evaluation). Recomputing them every epoch is then wasted work: at 224 pixels,
EfficientNet-Lite0's forward pass runs at 19 images/s on one CPU thread, its head at thousands.

So the model is split into a frozen `prefix` and a trainable `suffix` (split(): the network's own
modules, in forward order, nothing rewritten), the prefix runs once over each split, and the
epochs train and measure the suffix on its outputs. The outputs live on disk under
data/feature-cache/ (not a DVC output: like the resume checkpoints, they survive a killed run and
serve the next one), one file per split, named by a hash of everything that shapes them: the
prefix's weights and buffers, the images, the input size, the boundary and the network. A file
that doesn't match (another format version, a corrupt file) is recomputed, with one line.

When the cache can't apply, reason() says why in one line and training recomputes as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from stages import io as sio
from stages.data import Policy
from stages.networks import freeze, predict
from stages.networks.build import Normalized, network, prepare
from stages.runtime import repo_root

FORMAT = 1  # bump when what a cache file holds, or how it is computed, changes
CACHE = Path("data/feature-cache")  # under the repository root; not a DVC output
SUPPORTED = ("efficientnet_lite0", "cnn")  # the networks layers() knows


def layers(net: nn.Module, name: str) -> list[nn.Module]:
    """The network's forward pass as a sequence of its own modules (shared, not copied), the
    activations and pooling of its forward() as modules: nn.Sequential(*layers(net)) is net."""
    if name == "efficientnet_lite0":
        return [
            nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
            *net._blocks,
            nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            net._dropout,
            net._fc,
        ]
    if name == "cnn":
        return [*net.features, *net.head]
    raise ValueError(f"no layers() for {name}")


class Prepare(nn.Module):
    """What Normalized does before its network (the resize and the normalization), without
    holding the network: the prefix's state is its own."""

    def __init__(self, normalized: Normalized):
        super().__init__()
        self.register_buffer("mean", normalized.mean.clone())
        self.register_buffer("std", normalized.std.clone())
        self.size = normalized.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prepare(x, self.mean, self.std, self.size)


def split(model: nn.Module, name: str, freeze_setting: str) -> tuple[nn.Module, nn.Module]:
    """(prefix, suffix) with suffix(prefix(x)) == model(x): the prefix ends after the last layer
    that model.freeze holds fixed, and after the parameter-free layers that follow it (pooling,
    flattening: they shrink what is cached), but before any dropout."""
    net = network(model)
    frozen = {id(p) for p in freeze.frozen_parameters(net, name, freeze_setting)}
    seq = layers(net, name)
    cut = 1 + max(
        i for i, layer in enumerate(seq) if any(id(p) in frozen for p in layer.parameters())
    )
    while cut < len(seq) and not list(seq[cut].parameters()) and not is_dropout(seq[cut]):
        cut += 1
    if any(id(p) not in frozen for layer in seq[:cut] for p in layer.parameters()):
        raise ValueError(f"model.freeze = {freeze_setting} cuts a layer of {name}")
    start = [Prepare(model)] if isinstance(model, Normalized) else []
    return nn.Sequential(*start, *seq[:cut]), nn.Sequential(*seq[cut:])


def is_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd)


def moves_in_training(module: nn.Module) -> str | None:
    """What makes a module's output depend on training mode: batch norm, dropout, stochastic
    depth (Lite0's MBConv blocks with a skip)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "batch norm (it adapts in training mode; model.freeze_bn: true holds it fixed)"
        if is_dropout(m) and m.p > 0:
            return "dropout"
        if getattr(m, "skip", False) and getattr(m, "drop", 0) > 0:
            return "stochastic depth"
    return None


def wanted(params) -> bool:
    """Something is frozen, and train.feature_cache is on."""
    return params.model.freeze != "none" and params.train.feature_cache


def reason(params, world: int = 1, device: str = "cpu") -> str | None:
    """Why the cache can't apply to a run that wants it, in a few words; None when it can."""
    m, t, a = params.model, params.train, params.augment
    if m.name not in SUPPORTED:
        return f"{m.name} is not split for it (supported: {', '.join(SUPPORTED)})"
    if a.online and Policy.from_params(a).active:
        return "online augmentation changes the images every epoch"
    if a.mixup_alpha or a.cutmix_alpha:
        return "mixup / cutmix mix the images"
    if any(task.weight > 0 for task in (params.tasks.coarse, params.tasks.rotation)):
        return "auxiliary tasks are not built for it"
    if world > 1:
        return "distributed training is not built for it"
    if device != "cpu":
        return "it is built for CPUs only"
    if t.compile:
        return "train.compile is not built for it"
    if t.ema_decay or t.swa_start_epoch:
        return "weight averaging averages the whole network, not the suffix"
    return None


@dataclass
class Cache:
    """The frozen prefix's outputs of the training and validation sets, and the suffix that
    trains on them."""

    suffix: nn.Module
    train_x: torch.Tensor  # float32, one row per training image (offline copies included)
    val_x: torch.Tensor


def set_up(params, train_x, val_x, model: nn.Module, world=1, device="cpu", first_epoch=1):
    """The Cache for train, or None (with one line saying why, when the run wants one)."""
    unfreeze = params.train.unfreeze_at_epoch
    if not wanted(params) or (unfreeze and first_epoch >= unfreeze):
        return None  # nothing frozen, or a resumed run past the unfreeze: nothing to cache
    pieces = reason(params, world, device) or prefix_and_suffix(params, model)
    if isinstance(pieces, str):
        print(f"feature cache: not used: {pieces}; the frozen blocks run every epoch", flush=True)
        return None
    prefix, suffix = pieces
    return Cache(suffix, features(prefix, train_x, params), features(prefix, val_x, params))


def prefix_and_suffix(params, model: nn.Module):
    """split() of the model, or why its frozen prefix isn't a pure function of the image."""
    if not freeze.frozen_parameters(network(model), params.model.name, params.model.freeze):
        return "model.freeze holds nothing fixed"
    try:
        prefix, suffix = split(model, params.model.name, params.model.freeze)
    except ValueError as error:
        return str(error)
    if not params.model.freeze_bn:  # else freeze.hold_frozen_in_eval runs it as in evaluation
        moving = moves_in_training(prefix)
        if moving:
            return f"the frozen blocks hold {moving}"
    return prefix, suffix


def for_epoch(cache: Cache | None, data, model, still_frozen: bool):
    """train's Data and Model for one epoch: the cached features and the suffix while the prefix
    is frozen; as they are otherwise."""
    if cache is None or not still_frozen:
        return data, model
    return (
        replace(data, train_x=cache.train_x, val_x=cache.val_x),
        replace(model, forward=cache.suffix, measured=cache.suffix),
    )


def test_logits(model: nn.Module, trained_with, images: torch.Tensor) -> torch.Tensor | None:
    """evaluate's logits for the test images from the cache, or None when it can't apply (a
    network trained after train.unfreeze_at_epoch has a prefix that no other run shares)."""
    if not wanted(trained_with) or trained_with.train.unfreeze_at_epoch or reason(trained_with):
        return None
    pieces = prefix_and_suffix(trained_with, model)
    if isinstance(pieces, str):
        return None
    prefix, suffix = pieces
    cached = features(prefix, images, trained_with)
    return predict.predict(suffix, cached, batch_size=1000 if cached.dim() == 2 else None)


def features(prefix: nn.Module, images: torch.Tensor, params) -> torch.Tensor:
    """The prefix's outputs for uint8 images: from the cache file when it matches, else computed
    (in eval mode, without gradients) and written."""
    key = cache_key(prefix, images, params)
    path = repo_root() / CACHE / f"{key[:24]}.pt"
    if path.exists():
        try:
            saved = sio.load_torch(path)
        except Exception as error:  # a truncated or foreign file: any failure means recompute
            print(f"feature cache: {path} is unreadable ({type(error).__name__}): recomputing")
        else:
            if (
                isinstance(saved, dict)
                and saved.get("format") == FORMAT
                and saved.get("key") == key
            ):
                return saved["features"]
            print(f"feature cache: {path} is from another format version: recomputing")
    size = params.model.input_size or images.shape[-1]
    out = predict.predict(prefix, images, batch_size=predict.batch_size_for(size))
    sio.save_torch(path, {"format": FORMAT, "key": key, "features": out})
    return out


def cache_key(prefix: nn.Module, images: torch.Tensor, params) -> str:
    """sha256 of everything that shapes the prefix's outputs: the network and boundary, the
    input size, every weight and buffer of the prefix, and the images."""
    digest = hashlib.sha256()
    m = params.model
    what = {
        "name": m.name,
        "freeze": m.freeze,
        "freeze_bn": m.freeze_bn,
        "input_size": m.input_size,
    }
    digest.update(json.dumps(what, sort_keys=True).encode())
    for name, tensor in prefix.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
