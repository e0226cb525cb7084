"""Sharpness-aware minimization (SAM; Foret et al., "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021): train.sam_rho.

SAM looks for weights whose whole neighbourhood has a low loss, not just the point itself. Each
step takes the gradient g at the weights w, moves to the (approximately) worst point within a
ball of radius rho, w + rho * g / ||g||, takes the gradient there, moves back to w, and lets the
pipeline's own optimizer (SGD, Adam, AdamW) step with that second gradient. It is a wrapper
around the step, not an optimizer of its own, and costs a second forward and backward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn


def sam_backward(
    model: nn.Module, compute_loss: Callable[[], torch.Tensor], rho: float
) -> torch.Tensor:
    """Leave in .grad the gradient at the ascended weights, with the weights back where they
    were; returns the loss at the weights themselves. `compute_loss` runs the forward pass
    (the same batch, the same mix and the same penalties each time it is called).

    Under DDP the first pass runs in no_sync(): each process ascends along the gradient of its
    own share of the batch, which is the paper's m-sharpness with m the per-process batch (the
    paper found smaller m generalizes at least as well) and saves one all-reduce per step; the
    second pass's gradients are averaged across processes as usual, so every process takes the
    same step from the same (restored) weights."""
    loss = compute_loss()
    with getattr(model, "no_sync", contextlib.nullcontext)():
        loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # one norm over all of them
    scale = rho / (norm + 1e-12)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(p.grad * scale)
    for p in params:
        p.grad = None
    with batch_norm_stats_frozen(model):
        compute_loss().backward()
    with torch.no_grad():
        for p, w in zip(params, start, strict=True):
            p.copy_(w)  # a copy, not a subtraction: exactly the weights of before
    return loss


@contextlib.contextmanager
def batch_norm_stats_frozen(model: nn.Module):
    """The second pass normalizes with its own batch statistics, as the first, but leaves the
    running statistics alone: momentum 0 keeps running_mean/var, and the batch counter is put
    back. Otherwise each step would blend them in twice, once from weights the optimizer never
    takes (the ascended ones)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
        for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
