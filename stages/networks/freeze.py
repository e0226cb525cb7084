"""What model.freeze and model.freeze_bn hold fixed while fine-tuning.

model.freeze = none trains everything; backbone trains the head only (a linear probe);
all_but_last_<N> trains the last N blocks and the head. The blocks are each network's own
(architectures.blocks), in forward order. train.unfreeze_at_epoch lifts the freeze later on
(stages/train.py); model.freeze_bn turns batch norm into fixed affine layers.
"""

from __future__ import annotations

import torch.nn as nn

from stages.errors import StageError
from stages.networks import architectures


def frozen_parameters(net: nn.Module, name: str, freeze: str) -> list[nn.Parameter]:
    """The parameters that model.freeze holds fixed: none; every block (backbone: a linear
    probe); or all blocks but the last N."""
    if freeze == "none":
        return []
    parts = architectures.blocks(net, name)
    keep = 0 if freeze == "backbone" else int(freeze.rsplit("_", 1)[1])
    if keep > len(parts):
        raise StageError(f"model.freeze = {freeze}: {name} has only {len(parts)} blocks")
    return [
        p for block in parts[: len(parts) - keep] for module in block for p in module.parameters()
    ]


def freeze_batch_norm(net: nn.Module) -> nn.Module:
    """Every BatchNorm2d becomes torchvision's FrozenBatchNorm2d: statistics and affine
    parameters fixed, in training as in evaluation."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(
                {k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"}
            )
            setattr(net, name, frozen)
        else:
            freeze_batch_norm(child)
    return net
