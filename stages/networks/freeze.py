"""What model.freeze and model.freeze_bn hold fixed while fine-tuning.

model.freeze = none trains everything; backbone trains the head only (a linear probe);
all_but_last_<N> trains the last N blocks and the head. The blocks are each network's own
(architectures.blocks), in forward order. train.unfreeze_at_epoch lifts the freeze later on
(stages/train.py); model.freeze_bn turns batch norm into fixed affine layers.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from stages.errors import StageError
from stages.networks import architectures


def frozen_parameters(net: nn.Module, name: str, freeze: str) -> list[nn.Parameter]:
    """The parameters that model.freeze holds fixed: none; every block (backbone: a linear
    probe); or all blocks but the last N."""
    if freeze == "none":
        return []
    return [p for block in frozen_blocks(net, name, freeze) for m in block for p in m.parameters()]


def frozen_blocks(net: nn.Module, name: str, freeze: str) -> list[list[nn.Module]]:
    """The blocks that model.freeze (not none) holds fixed, in forward order."""
    parts = architectures.blocks(net, name)
    keep = 0 if freeze == "backbone" else int(freeze.rsplit("_", 1)[1])
    if keep > len(parts):
        raise StageError(f"model.freeze = {freeze}: {name} has only {len(parts)} blocks")
    return parts[: len(parts) - keep]


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


def hold_frozen_in_eval(net: nn.Module, name: str, freeze: str) -> None:
    """With model.freeze_bn, a frozen block runs as in evaluation while it is frozen: no dropout
    or stochastic depth inside it, so its output is a pure function of its input, which the
    feature cache (stages/networks/feature_cache.py) needs. A forward pre-hook on each of its
    modules does it after the training loop's model.train(); once train.unfreeze_at_epoch gives
    the block gradients again, model.train() rules as for any block."""
    for block in frozen_blocks(net, name, freeze):
        params = [p for module in block for p in module.parameters()]
        for module in block:
            module.register_forward_pre_hook(partial(_eval_while_frozen, params))


def _eval_while_frozen(params: list[nn.Parameter], module: nn.Module, args) -> None:
    if not any(p.requires_grad for p in params):
        module.eval()
