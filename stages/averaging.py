"""Weight averaging: an exponential moving average (EMA) of the weights, or stochastic weight
averaging (SWA, Izmailov et al., 2018), kept beside the trained model.

Both are torch.optim.swa_utils.AveragedModel: a copy of the model whose weights follow the
trained ones. EMA (train.ema_decay) blends them in after every optimizer step,
avg = decay * avg + (1 - decay) * w; SWA (train.swa_start_epoch) takes the plain mean of the
weights at the end of each epoch from that epoch on. Once it holds anything, the average is the
model the run measures (the curves, early stopping) and keeps (models/model.pt, MLflow).
"""

from __future__ import annotations

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def averaged_model(
    model: nn.Module, ema_decay: float, swa_start_epoch: int
) -> AveragedModel | None:
    """The average of `model` (the unwrapped module, never DDP or compiled), or None when both
    are off. use_buffers=True averages the batch-norm running statistics too, in the same way as
    the weights: the running statistics of the raw model describe the activations of the raw
    weights, not of their average, and an averaged network evaluated with them normalizes its
    layers wrongly. (For SWA this mean of running statistics stands in for torch's update_bn, a
    further pass over the training set after every average.)"""
    if ema_decay:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    if swa_start_epoch:
        return AveragedModel(model, use_buffers=True)  # the default: the equal-weight mean
    return None


def measured(averaged: AveragedModel | None, model: nn.Module) -> nn.Module:
    """What the run measures and keeps: the average once it has taken in any weights (EMA from
    the first step, SWA from train.swa_start_epoch on), the trained model before that."""
    if averaged is not None and averaged.n_averaged.item() > 0:
        return averaged.module
    return model
