"""The networks, and inference in large batches.

`net` is exactly the source document's network: conv 3→6 (5×5), max-pool 2, conv 6→16 (5×5),
max-pool 2, fully connected 400→120→84→classes, ReLU. It expects 32×32 inputs. `cnn` is a plain
configurable CNN for the model-size study: depth, width, batch norm. `resnet9` is the network of
the fast GPU preset (stages/presets/fast-gpu.yaml). The ImageNet backbones for
fine-tuning (resnet18, mobilenet_v3_small, efficientnet_b0, efficientnet_lite0) come from
stages/pretrained.py, with a new head for the target classes.

Every model takes [0, 1] pixels at the data's size: `Normalized` resizes them to what the
network wants and normalizes them, inside the model, so the saved and logged model needs no
preprocessing of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages import pretrained, tasks
from stages.data import to_float
from stages.errors import StageError
from stages.params import BACKBONES


class Net(nn.Module):
    """The source network. width scales every layer; dropout layers exist only when p > 0, so the
    defaults build exactly the source's modules (and the same initialization under a seed)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.0,
                 conv_dropout: float = 0.0):
        super().__init__()
        c1, c2, h1, h2 = (max(1, round(n * width)) for n in (6, 16, 120, 84))
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.conv_drop = nn.Dropout2d(conv_dropout) if conv_dropout else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_drop(self.pool(F.relu(self.conv1(x))))
        x = self.conv_drop(self.pool(F.relu(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)


class CNN(nn.Module):
    """depth blocks of 3×3 conv (32·width·2^i channels), [batch norm], ReLU, max-pool 2,
    [spatial dropout]; then global average pooling, [dropout] and one dense layer."""

    def __init__(self, num_classes: int = 10, depth: int = 3, width: float = 1.0,
                 batch_norm: bool = False, dropout: float = 0.0, conv_dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(depth):
            out = max(1, round(32 * width * 2 ** i))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            # Identity when off, so that the state dict's keys don't depend on dropout.
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2),
                       nn.Dropout2d(conv_dropout) if conv_dropout else nn.Identity()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(dropout) if dropout else nn.Identity(),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResNet9(nn.Module):
    """The small residual network of the fast CIFAR-10 trainers (Myrtle.ai's DAWNBench entry,
    94% in 24 epochs): a 64-channel conv, then three stages of conv-BN-ReLU-max-pool at 128, 256
    and 512 channels, the first and the last followed by a residual block of two such convs;
    global max-pool and one dense layer, whose logits are scaled by 1/8 (softer at the start)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c0, c1, c2, c3 = (max(1, round(n * width)) for n in (64, 128, 256, 512))

        def conv_bn(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.prep = conv_bn(3, c0)
        self.layer1 = nn.Sequential(conv_bn(c0, c1), nn.MaxPool2d(2))
        self.res1 = nn.Sequential(conv_bn(c1, c1), conv_bn(c1, c1))
        self.layer2 = nn.Sequential(conv_bn(c1, c2), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(c2, c3), nn.MaxPool2d(2))
        self.res3 = nn.Sequential(conv_bn(c3, c3), conv_bn(c3, c3))
        self.fc = nn.Linear(c3, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.prep(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        x = x + self.res3(x)
        return self.fc(torch.amax(x, dim=(2, 3))) * 0.125


class Normalized(nn.Module):
    """Resize to `size` (when given), (x - mean) / std per channel, then the network."""

    def __init__(self, net: nn.Module, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 size: int | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.size = size
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.net((x - self.mean) / self.std)


def build(params, num_classes: int, image_size: int, mean_std=None) -> nn.Module:
    """The network that params.model names, randomly initialized (train loads pretrained weights
    into `network(model)`); wrapped in Normalized when it has to resize or normalize, and in
    tasks.MultiTask when an auxiliary task is on."""
    model = _build_one(params, num_classes, image_size, mean_std)
    sizes = tasks.output_sizes(params.tasks)
    if not sizes:
        return model
    head = network(model).get_submodule(pretrained.HEADS[params.model.name])
    return tasks.MultiTask(model, head, sizes, tasks.active(params.tasks),
                           learn_weights=params.tasks.weighting == "uncertainty")


def _build_one(params, num_classes: int, image_size: int, mean_std=None) -> nn.Module:
    m = params.model
    size = m.input_size or image_size
    if m.name in BACKBONES:
        net: nn.Module = pretrained.imagenet_architecture(m.name)
        pretrained.replace_head(net, m.name, num_classes)
    elif m.name == "net":
        if size != 32:
            raise StageError(f"model.name = net needs 32×32 inputs (data.image_size or "
                             f"model.input_size; got {size}): its first dense layer expects 16×5×5 features")
        net = Net(num_classes, m.width, m.dropout, m.conv_dropout)
    elif m.name == "resnet9":
        if size < 8:
            raise StageError(f"model.name = resnet9 halves the image 3 times: needs inputs of "
                             f"at least 8 pixels (got {size})")
        net = ResNet9(num_classes, m.width)
    else:
        if size < 2 ** m.depth:
            raise StageError(f"model.depth = {m.depth} halves the image {m.depth} times: "
                             f"needs data.image_size >= {2 ** m.depth} (got {size})")
        net = CNN(num_classes, m.depth, m.width, m.batch_norm, m.dropout, m.conv_dropout)
    if m.freeze_bn:
        pretrained.freeze_batch_norm(net)
    if m.name in BACKBONES:
        return Normalized(net, *pretrained.input_mean_std(m.name), size=size)
    if params.data.normalize == "dataset":
        return Normalized(net, *(mean_std or ((0.0,) * 3, (1.0,) * 3)),
                          size=size if size != image_size else None)
    if size != image_size:
        return Normalized(net, size=size)
    return net


def network(model: nn.Module) -> nn.Module:
    """The network inside the MultiTask and Normalized wrappers, whose parameter names the
    weights files use."""
    model = tasks.unwrap(model)
    return model.net if isinstance(model, Normalized) else model


def channel_mean_std(images: torch.Tensor, chunk: int = 10_000):
    """Per-channel mean and std of uint8 images on the [0, 1] scale, without a float copy of all."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean ** 2).clamp(min=1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def cpu_threads(repo_root: Path) -> int:
    """The cores this process may use, shared among DVC's running queue workers.

    `dvc queue start -j N` runs N experiments at once; N processes that each use every core
    oversubscribe them, and PyTorch's spinning OpenMP threads then collapse (README "Parallel
    queues": on 2 cores, two 2-thread trainings together were slower than one alone). Each
    worker leaves a pid file in DVC's queue folder; the live ones are counted.
    """
    cores = len(os.sched_getaffinity(0))
    workers = 0
    for pid_file in (repo_root / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
            workers += 1
        except PermissionError:
            workers += 1  # alive, but not ours to signal
        except (ValueError, OSError):
            pass  # a stale file of a worker that has gone
    return max(1, cores // max(1, workers))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int | None = None,
            all_tasks: bool = False):
    """Logits for uint8 images, in eval mode (no dropout) and large batches without gradients:
    1,000 images of 32×32, fewer of larger inputs (activations grow with the pixels).
    all_tasks: a MultiTask model's {task: logits}, every head on the same images."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    if batch_size is None:
        shown = tasks.unwrap(inner)
        size = shown.size if isinstance(shown, Normalized) and shown.size else images.shape[-1]
        batch_size = max(50, min(1000, 1000 * 32 * 32 // (size * size)))
    device = next(inner.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(images), batch_size):
            x = to_float(images[i:i + batch_size].to(device))
            outputs.append(model(x, tasks=True) if all_tasks else {"main": model(x)})
    model.train(was_training)
    logits = {k: torch.cat([o[k] for o in outputs]).float() for k in outputs[0]}
    return logits if all_tasks else logits["main"]


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prefix: str,
            coarse_mapping: torch.Tensor | None = None, outputs: dict | None = None) -> dict[str, float]:
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
