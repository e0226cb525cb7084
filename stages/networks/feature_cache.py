"""train.feature_cache: the frozen first part of a network, computed once per image.

With model.freeze = backbone (a linear probe) or all_but_last_<N>, the frozen blocks give every
image the same output in every epoch, as long as nothing random reaches them: no online
augmentation or mixing of the inputs (the frozen blocks themselves run as in evaluation,
freeze.hold_frozen_in_eval: their batch norm does not adapt, their dropout is off). Recomputing
them every epoch is then wasted work: at 224 pixels, EfficientNet-Lite0's forward pass runs at 19
images/s on one CPU thread, its head at thousands.

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
from stages.data import Policy, to_float
from stages.networks import freeze, predict, registry
from stages.networks.build import Normalized, network, prepare
from stages.runtime import repo_root

FORMAT = 2  # bump when what a cache file holds, or how it is computed, changes (2: PREFIX_BATCH)
# Images per batch of the prefix's one pass: small batches keep a block's activations in the
# CPU's caches, where the large ones of predict.batch_size_for spill to memory (measured at 224 px
# in docs/fine-tuning.md#the-prefixs-pass-small-batches).
PREFIX_BATCH = 8
CACHE = Path("data/feature-cache")  # under the repository root; not a DVC output


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
    seq = registry.network(name).layers(net)  # its own modules: nothing copied or rewritten
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


def moves_in_training(prefix: nn.Module, held: set[int]) -> str | None:
    """What makes the prefix's output depend on training mode, outside the modules in `held`
    (the frozen blocks', which run as in evaluation): batch norm, dropout, stochastic depth
    (Lite0's MBConv blocks with a skip)."""
    for m in prefix.modules():
        if id(m) in held:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "batch norm outside the frozen blocks"
        if is_dropout(m) and m.p > 0:
            return "dropout between the frozen blocks"
        if getattr(m, "skip", False) and getattr(m, "drop", 0) > 0:
            return "stochastic depth outside the frozen blocks"
    return None


def wanted(params) -> bool:
    """Something is frozen, and train.feature_cache is on."""
    return params.model.freeze != "none" and params.train.feature_cache


def reason(params, world: int = 1, device: str = "cpu") -> str | None:
    """Why the cache can't apply to a run that wants it, in a few words; None when it can."""
    m, t, a = params.model, params.train, params.augment
    if registry.network(m.name).layers is None:
        return f"{m.name} is not split for it (its registry entry gives no layers)"
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
    pieces = reason(params, world, device) or prefix_and_suffix(params, model, train_x[:2])
    if isinstance(pieces, str):
        print(f"feature cache: not used: {pieces}; the frozen blocks run every epoch", flush=True)
        return None
    prefix, suffix = pieces
    return Cache(suffix, features(prefix, train_x, params), features(prefix, val_x, params))


def prefix_and_suffix(params, model: nn.Module, sample: torch.Tensor):
    """split() of the model, or why its frozen prefix isn't a pure function of the image, or why
    the split is not the model: its layers, run in sequence, must give its logits for the uint8
    images of `sample` (a timm model whose forward is not a sequence of its children: a ViT)."""
    net, name, setting = network(model), params.model.name, params.model.freeze
    if not freeze.frozen_parameters(net, name, setting):
        return "model.freeze holds nothing fixed"
    try:
        prefix, suffix = split(model, name, setting)
    except ValueError as error:
        return str(error)
    held = {  # run as in evaluation while frozen (freeze.hold_frozen_in_eval)
        id(m)
        for block in freeze.frozen_blocks(net, name, setting)
        for top in block
        for m in top.modules()
    }
    moving = moves_in_training(prefix, held)
    if moving:
        return f"the prefix holds {moving}"
    if not same_logits(model, nn.Sequential(prefix, suffix), to_float(sample)):
        return f"{name}'s layers in sequence are not its forward pass"
    return prefix, suffix


@torch.no_grad()
def same_logits(model: nn.Module, split_model: nn.Module, x: torch.Tensor) -> bool:
    was_training = model.training
    model.eval()
    try:
        return torch.allclose(split_model(x), model(x), rtol=1e-4, atol=1e-5)
    except RuntimeError:  # shapes that don't chain
        return False
    finally:
        model.train(was_training)


def for_epoch(cache: Cache | None, data, model, still_frozen: bool):
    """train's Data and Model for one epoch: the cached features and the suffix while the prefix
    is frozen; as they are otherwise."""
    if cache is None or not still_frozen:
        return data, model
    return (
        replace(data, train_x=cache.train_x, val_x=cache.val_x),
        replace(model, for_training=cache.suffix, for_measuring=cache.suffix),
    )


def test_logits(model: nn.Module, trained_with, images: torch.Tensor) -> torch.Tensor | None:
    """evaluate's logits for the test images from the cache, or None when it can't apply (a
    network trained after train.unfreeze_at_epoch has a prefix that no other run shares; a
    model on a GPU)."""
    device = next(model.parameters()).device.type
    if (
        trained_with.model.freeze == "none"
        or trained_with.train.unfreeze_at_epoch
        or reason(trained_with, device=device)
    ):
        return None
    pieces = prefix_and_suffix(trained_with, model, images[:2])
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
    out = predict.predict(prefix, images, batch_size=PREFIX_BATCH)
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
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
