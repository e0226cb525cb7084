"""Multi-task training: one shared backbone, one head per task.

The main task is the classification the pipeline has always trained. Two auxiliary tasks can
share its backbone (params.yaml `tasks`), each switched on by a loss weight above zero:

    coarse    the classes grouped (tasks.coarse.groups, e.g. vehicles against animals): the
              backbone must also separate the groups, a coarser and easier labelling
    rotation  self-supervised: each training image is turned by 0, 90, 180 or 270 degrees and
              the head predicts which (Gidaris et al., 2018). It needs no labels, so it asks the
              backbone for features of shape and orientation that the class labels alone don't

Each auxiliary head is a new linear layer on the features that feed the main head (the main
head's input, captured by a hook), so any network of the pipeline, pretrained or not, becomes
a multi-task network without changes to its code or its state-dict names.

Loss weighting (tasks.weighting):
    fixed        loss = main + sum_t weight_t * loss_t
    uncertainty  Kendall, Gal & Cipolla (2018): loss = sum_t exp(-s_t) * loss_t + s_t / 2 over
                 every task, the main one included, with s_t = log sigma_t^2 learned alongside the
                 weights; s_t starts at -log(weight_t) (0 for the main task), so the weights
                 start where params.yaml puts them and then move

With every weight at 0 no wrapper is built: the model, its initialization and every random
draw of training are exactly those of a single-task run.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.errors import StageError

ROTATIONS = 4  # 0, 90, 180, 270 degrees


def active(tasks) -> dict[str, float]:
    """{task: weight} of the auxiliary tasks that are on (weight > 0), in a fixed order."""
    return {
        name: getattr(tasks, name).weight
        for name in ("coarse", "rotation")
        if getattr(tasks, name).weight > 0
    }


def output_sizes(tasks) -> dict[str, int]:
    sizes = {"coarse": len(tasks.coarse.groups), "rotation": ROTATIONS}
    return {name: sizes[name] for name in active(tasks)}


class MultiTask(nn.Module):
    """`model` with one more linear head per auxiliary task, on the features of its main head.

    model(x) gives the main task's logits, as before: evaluation, prediction and the logged
    MLflow model see a plain classifier. model(x, rotated, tasks=True) gives every task's logits:
    "main" and "coarse" from x, "rotation" from the rotated images (a second pass through the
    backbone, inside the same forward, so that DistributedDataParallel sees one forward), or
    from x when no rotated images are given.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Linear,
        sizes: dict[str, int],
        weights: dict[str, float],
        learn_weights: bool,
    ):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({t: nn.Linear(head.in_features, n) for t, n in sizes.items()})
        # log sigma^2 per task, main first (uncertainty weighting); absent with fixed weights
        if learn_weights:
            start = [0.0] + [-math.log(weights[t]) for t in sizes]
            self.log_vars = nn.Parameter(torch.tensor(start))
        self._features: list[torch.Tensor] | None = None  # a list only while forward wants them
        head.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, _module, inputs):
        if self._features is not None:
            self._features.append(inputs[0])

    def forward(self, x: torch.Tensor, rotated: torch.Tensor | None = None, tasks: bool = False):
        if not tasks:
            return self.model(x)
        self._features = []
        try:
            out = {"main": self.model(x)}
            if "coarse" in self.heads:
                out["coarse"] = self.heads["coarse"](self._features[0])
            if "rotation" in self.heads:  # on the rotated images; without them, on x
                if rotated is not None:
                    self.model(rotated)
                out["rotation"] = self.heads["rotation"](self._features[-1])
        finally:
            self._features = None
        return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, MultiTask) else model


def coarse_mapping(groups: dict[str, list[str]], classes: list[str]) -> torch.Tensor:
    """class index -> group index; every class of the data in exactly one group."""
    group_of: dict[str, int] = {}
    for g, names in enumerate(groups.values()):
        for name in names:
            group_of[name] = g
    unknown = sorted(set(group_of) - set(classes))
    if unknown:
        raise StageError(
            f"tasks.coarse.groups names classes the data doesn't have: {unknown} "
            f"(its classes: {', '.join(classes)})"
        )
    missing = [c for c in classes if c not in group_of]
    if missing:
        raise StageError(
            f"tasks.coarse.groups leaves classes out: {missing} "
            "(every class must be in exactly one group)"
        )
    return torch.tensor([group_of[c] for c in classes])


def coarse_mapping_if_on(tasks, classes: list[str]) -> torch.Tensor | None:
    """The class -> group mapping when the coarse task is on, else None."""
    return coarse_mapping(tasks.coarse.groups, classes) if "coarse" in active(tasks) else None


def coarse_targets(targets: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Group labels for class labels; group probabilities for class probabilities (mixup)."""
    if targets.ndim == 1:
        return mapping.to(targets.device)[targets]
    one_hot = F.one_hot(mapping, int(mapping.max()) + 1).to(targets)
    return targets @ one_hot


def rotate(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each (square) image turned counter-clockwise by turns[i] * 90 degrees."""
    out = images.clone()
    for k in range(1, ROTATIONS):
        chosen = (turns == k).nonzero().squeeze(1).to(images.device)
        if len(chosen):
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


def evaluation_turns(n: int) -> torch.Tensor:
    """Rotation labels for measuring the rotation task: image i turned (i mod 4) times, so the
    four rotations are equally common and a split is measured in one pass, the same every time."""
    return torch.arange(n) % ROTATIONS


def combine(
    losses: dict[str, torch.Tensor], weights: dict[str, float], log_vars: torch.Tensor | None
) -> torch.Tensor:
    """The training loss from each task's loss ("main" first): fixed or uncertainty weighting."""
    if log_vars is None:
        return losses["main"] + sum(weights[t] * losses[t] for t in weights)
    return sum(torch.exp(-s) * loss + s / 2 for s, loss in zip(log_vars, losses.values()))


def current_weights(model: nn.Module, weights: dict[str, float]) -> dict[str, float]:
    """The weight each auxiliary task's loss gets now, relative to the main task's."""
    log_vars = getattr(model, "log_vars", None)
    if log_vars is None:
        return dict(weights)
    s = log_vars.detach().cpu()
    return {t: math.exp(s[0] - s[i + 1]) for i, t in enumerate(weights)}


class TaskLoss:
    """The training loss of a MultiTask model on one batch.

    `x` is the batch as the main task trains on it (augmented, perhaps mixed), `clean` the same
    images before mixing: rotation turns those, with a turn per image drawn from `generator`."""

    def __init__(
        self,
        weights: dict[str, float],
        coarse_mapping: torch.Tensor | None,
        log_vars: torch.Tensor | None,
    ):
        self.weights, self.mapping, self.log_vars = weights, coarse_mapping, log_vars

    def __call__(self, model, x, clean, targets, main_loss, generator) -> torch.Tensor:
        rotated = turns = None
        if "rotation" in self.weights:
            turns = torch.randint(ROTATIONS, (len(clean),), generator=generator)
            rotated = rotate(clean, turns)
        out = model(x, rotated, tasks=True)
        losses = {"main": main_loss(out["main"], targets)}
        if "coarse" in self.weights:
            losses["coarse"] = F.cross_entropy(out["coarse"], coarse_targets(targets, self.mapping))
        if "rotation" in self.weights:
            losses["rotation"] = F.cross_entropy(out["rotation"], turns.to(x.device))
        return combine(losses, self.weights, self.log_vars)
