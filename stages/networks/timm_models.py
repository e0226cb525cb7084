"""timm (PyTorch Image Models) as a family: model.name = timm/<architecture>, any of its models.

Each architecture's registry entry is made from timm's own description of it: the input size and
normalization from its pretrained_cfg (what its weights saw), the classifier from
pretrained_cfg.classifier, a new head from timm.create_model(num_classes=...). Its blocks are its
children in forward order, a stage container (a Sequential or ModuleList, like EfficientNet's
`blocks` or ResNet's `layer1`) counted as its stages, and the head's own norm or pooling layers
as blocks before the classifier; parameters the model holds itself (a ViT's cls_token and
pos_embed) are the first block. Its layers (for the feature cache) are the same children with
the parameter-free ones kept; where a model's forward is not that sequence (a ViT), the cache
notices and recomputes (feature_cache.prefix_and_suffix compares them on a batch).

model.pretrained = imagenet: timm's own weights, downloaded by timm on first use (from the
Hugging Face hub: a machine without internet can't) and kept as a state dict in
$TORCH_HOME/hub/checkpoints/timm/; model.pretrained = <file> loads a state dict of the same
architecture (model.state_dict() of timm.create_model(<architecture>)) offline, strictly.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn as nn

from stages import io as sio
from stages.errors import StageError
from stages.networks import registry


@functools.cache
def network(arch: str) -> registry.Network:
    """The registry entry of timm/<arch> (KeyError for an architecture timm doesn't have)."""
    import timm

    if not timm.is_model(arch):
        raise KeyError(f"timm has no architecture {arch!r} (timm.list_models() lists them)")
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.classifier:
        raise KeyError(f"timm's {arch!r} has no pretrained_cfg naming its classifier")
    size = cfg.input_size[-1]
    low = size if cfg.fixed_input_size else 32
    why = f"timm's pretrained_cfg: its weights saw {size} px" + (
        " and it takes no other size" if cfg.fixed_input_size else ""
    )
    return registry.Network(
        build=lambda m, classes: timm.create_model(arch, pretrained=False, num_classes=classes),
        head=cfg.classifier,
        blocks=lambda net: [[m] for m in layers(net, cfg.classifier) if has_parameters(m)][:-1],
        layers=lambda net: layers(net, cfg.classifier),
        input_sizes=lambda m: (low, max(low, size), why),
        mean_std=(tuple(cfg.mean), tuple(cfg.std)),
        weights=lambda: imagenet_file(arch),
    )


def layers(net: nn.Module, head: str) -> list[nn.Module]:
    """net's children in forward order, stage containers as their stages, the child holding the
    classifier as its own children; the parameters net holds itself first, in a module of their
    own. Ends with the classifier."""
    out: list[nn.Module] = []
    own = ParametersOf(net)
    if own.has_any():
        out.append(own)
    for name, child in net.named_children():
        if name == head:
            out.append(child)
        elif head.startswith(name + "."):  # the head's container: its pooling, norm, classifier
            out += [c for n, c in child.named_children() if f"{name}.{n}" != head]
            out.append(net.get_submodule(head))
        elif isinstance(child, (nn.Sequential, nn.ModuleList)):
            out += list(child.children())
        else:
            out.append(child)
    return out


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class ParametersOf(nn.Module):
    """The parameters a model holds directly (a ViT's cls_token, pos_embed): the same tensors,
    registered here too, so that model.freeze, layer decay and L2-SP reach them as a block. Not
    a layer of the forward pass: it passes its input through."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for name, p in net.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def has_any(self) -> bool:
        return bool(self._parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def imagenet_file(arch: str) -> Path:
    """timm's pretrained weights of `arch` as a state dict file: downloaded by timm once, kept."""
    import timm

    safe = re.sub(r"[^\w.-]", "_", arch)  # a file name for any architecture name
    path = Path(torch.hub.get_dir()) / "checkpoints" / "timm" / f"{safe}.pt"
    if not path.exists():
        try:
            net = timm.create_model(arch, pretrained=True)
        except Exception as exc:
            raise StageError(
                f"could not get timm's pretrained weights of {arch} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}): timm downloads them on first use; "
                "offline, set model.pretrained to a state dict file of the architecture"
            ) from None
        sio.save_torch(path, net.state_dict())
    return path
