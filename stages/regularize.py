"""Regularizers that act on the loss or the labels: L1, L2, class weights, mixup and cutmix.

L1 and L2 here are explicit penalties added to the loss, over the weights only: every parameter
with two or more dimensions (conv kernels, dense matrices). Biases and batch-norm scales are 1-D
and left alone, as usual: penalizing them constrains nothing about the model's complexity.

`train.weight_decay` is different, and lives in the optimizer: SGD adds weight_decay * w to each
gradient (the same as an L2 penalty of weight_decay / 2 * sum w^2, but applied to every parameter);
Adam folds it into its adaptive step, so large-gradient weights are decayed less; AdamW decouples
it and shrinks every weight by lr * weight_decay per step, whatever its gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum |w| over the weights."""
    return sum(p.abs().sum() for p in penalized_weights(model))  # type: ignore[return-value]


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """sum w^2 over the weights."""
    return sum(p.pow(2).sum() for p in penalized_weights(model))  # type: ignore[return-value]


def l2_sp_penalty(net: nn.Module, start_values: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum (w - w0)^2 over the pretrained weights w0 (Li et al., 2018, "Explicit inductive bias
    for transfer learning"): plain L2 pulls the weights to zero, forgetting what pretraining
    learned; L2-SP pulls them back to where fine-tuning started. The new head has no starting
    point and is not in it (train.l2 covers it)."""
    return sum(
        (p - start_values[k]).pow(2).sum()
        for k, p in net.named_parameters()  # type: ignore[return-value]
        if k in start_values and p.ndim > 1 and p.requires_grad
    )


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """weight_c = N / (K * n_c): inverse class frequency, 1 for every class of a balanced set."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


def label_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """torchvision's batch MixUp / CutMix (one of the two per batch when both are on), or None.

    Called as `images, targets = mixer(images, labels)`: targets are class probabilities that sum
    to one. They draw from torch's global generator, which train seeds at every epoch.
    """
    from torchvision.transforms import v2  # imported when used: torchvision costs seconds

    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
