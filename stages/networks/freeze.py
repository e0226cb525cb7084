"""What model.freeze and model.freeze_bn hold fixed while fine-tuning.

model.freeze = none trains everything; backbone trains the head only (a linear probe);
all_but_last_<N> trains the last N blocks and the head. The blocks are each network's own
(their registry entries), in forward order. Frozen means frozen: a frozen block also runs as in
evaluation (hold_frozen_in_eval), so its batch-norm statistics stay fixed and its dropout and
stochastic depth are off, as Keras runs frozen batch norm and timm's freeze helper freezes it; a
head-only run is then a true linear probe, which the feature cache serves. train.unfreeze_at_epoch
lifts the freeze later on (stages/train.py); model.freeze_bn turns every batch norm, the trained
blocks' too, into fixed affine layers.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from stages.errors import StageError
from stages.networks import registry


def frozen_parameters(net: nn.Module, name: str, freeze: str) -> list[nn.Parameter]:
    """The parameters that model.freeze holds fixed: none; every block (backbone: a linear
    probe); or all blocks but the last N."""
    if freeze == "none":
        return []
    return [p for block in frozen_blocks(net, name, freeze) for m in block for p in m.parameters()]


def frozen_blocks(net: nn.Module, name: str, freeze: str) -> list[list[nn.Module]]:
    """The blocks that model.freeze (not none) holds fixed, in forward order."""
    parts = registry.network(name).blocks(net)
    keep = 0 if freeze == "backbone" else int(freeze.rsplit("_", 1)[1])
    if keep > len(parts):
        raise StageError(f"model.freeze = {freeze}: {name} has only {len(parts)} blocks")
    return parts[: len(parts) - keep]


def freeze_batch_norm(net: nn.Module) -> nn.Module:
    """Every BatchNorm2d becomes torchvision's FrozenBatchNorm2d: statistics and affine
    parameters fixed, in training as in evaluation. timm's batch norm with its activation
    (BatchNormAct2d, a subclass) becomes timm's frozen one, the activation kept."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in net.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(
                {k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"}
            )
            setattr(net, name, frozen)
        elif isinstance(child, nn.BatchNorm2d):
            from timm.layers import freeze_batch_norm_2d

            setattr(net, name, freeze_batch_norm_2d(child))
        else:
            freeze_batch_norm(child)
    return net


def hold_frozen_in_eval(net: nn.Module, name: str, freeze: str) -> None:
    """A frozen block runs as in evaluation while it is frozen: batch norm with its running
    statistics, which it no longer updates, and no dropout or stochastic depth inside it, so its
    output is a pure function of its input, which the feature cache
    (stages/networks/feature_cache.py) needs. A forward pre-hook on each of its modules does it
    after the training loop's model.train(); once train.unfreeze_at_epoch gives the block
    gradients again, model.train() rules as for any block."""
    for block in frozen_blocks(net, name, freeze):
        params = [p for module in block for p in module.parameters()]
        for module in block:
            module.register_forward_pre_hook(partial(_eval_while_frozen, params))


def _eval_while_frozen(params: list[nn.Parameter], module: nn.Module, args) -> None:
    if not any(p.requires_grad for p in params):
        module.eval()
