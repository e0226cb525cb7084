"""The networks, and inference in large batches.

`net` is exactly the source document's network: conv 3→6 (5×5), max-pool 2, conv 6→16 (5×5),
max-pool 2, fully connected 400→120→84→classes, ReLU. It expects 32×32 inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.data import to_float
from stages.errors import StageError


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build(model_params, num_classes: int, image_size: int) -> nn.Module:
    if model_params.name == "net":
        if image_size != 32:
            raise StageError(f"model.name = net needs data.image_size = 32 (got {image_size}): "
                             "its first dense layer expects 16×5×5 features")
        return Net(num_classes)
    raise StageError(f"model.name = {model_params.name!r} is not built here")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits for uint8 images, in eval mode (no dropout) and large batches without gradients."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(to_float(images[i:i + batch_size]))
                        for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return logits


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy
