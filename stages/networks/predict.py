"""Inference in large batches, and the loss and accuracy of a model on a split.

Used by train (the per-epoch measurement of the clean training and validation sets) and by
evaluate (the test set), so both measure the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.data import to_float
from stages.networks import tasks
from stages.networks.build import Normalized
from stages.runtime import keep_fair

# Rows per batch over cached feature maps (docs/fine-tuning.md, "The prefix's pass: small batches")
MAP_BATCH = 8


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int | None = None, all_tasks: bool = False
):
    """Logits for uint8 images, in eval mode (no dropout) and large batches without gradients:
    1,000 images of 32×32, fewer of larger inputs (activations grow with the pixels); a feature
    cache's float maps in batches of MAP_BATCH.
    all_tasks: a MultiTask model's {task: logits}, every head on the same images."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    if batch_size is None and images.is_floating_point() and images.dim() == 4:
        # a feature cache's maps (the trainable suffix measuring its rows): the blocks after them
        # widen each map several times, and small batches keep that in the CPU's caches
        batch_size = MAP_BATCH
    if batch_size is None:
        shown = tasks.unwrap(inner)
        size = shown.size if isinstance(shown, Normalized) and shown.size else images.shape[-1]
        batch_size = batch_size_for(size)
    device = next(inner.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(images), batch_size):
            keep_fair()  # the threads follow what else computes on this machine
            x = to_float(images[i : i + batch_size].to(device))
            outputs.append(model(x, tasks=True) if all_tasks else {"main": model(x)})
    model.train(was_training)
    # the logits go where the images were: a model on a GPU can measure CPU-held images
    logits = {k: torch.cat([o[k] for o in outputs]).float().to(images.device) for k in outputs[0]}
    return logits if all_tasks else logits["main"]


def batch_size_for(size: int) -> int:
    """Images per inference batch at size×size pixels: 1,000 at 32, fewer when larger."""
    return max(50, min(1000, 1000 * 32 * 32 // (size * size)))


def measure(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prefix: str,
    coarse_mapping: torch.Tensor | None = None,
    outputs: dict | None = None,
) -> dict[str, float]:
    """<prefix>_loss and <prefix>_accuracy of the main task on a split; for a MultiTask model
    also <prefix>_<task>_loss and _accuracy of each auxiliary task (rotation: image i of the
    split turned i mod 4 times, so one pass measures all four turns). `outputs`: the model's
    predict(all_tasks=True) on these images, when the caller has it already."""
    if not isinstance(getattr(model, "_orig_mod", model), tasks.MultiTask):  # under torch.compile
        loss, accuracy = loss_and_accuracy(predict(model, images), labels)
        return {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}
    out = dict(outputs) if outputs is not None else predict(model, images, all_tasks=True)
    targets = {"main": labels}
    if "coarse" in out:
        targets["coarse"] = tasks.coarse_targets(labels, coarse_mapping)
    if "rotation" in out:
        turns = tasks.evaluation_turns(len(images))
        out["rotation"] = predict(model, tasks.rotate(images, turns), all_tasks=True)["rotation"]
        targets["rotation"] = turns
    metrics = {}
    for task, target in targets.items():
        name = prefix if task == "main" else f"{prefix}_{task}"
        metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = loss_and_accuracy(out[task], target)
    return metrics


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy
