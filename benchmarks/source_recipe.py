"""The source document's training loop as written, for several seeds: what the recipe itself gives.

    python benchmarks/source_recipe.py [SEED ...]      (default: seeds 0-9; after `dvc repro download`)

The network, the loss, SGD (lr 0.001, momentum 0.9), shuffled batches of 100 and 10 epochs over all
50,000 training images are the source's, line for line; only the data come from the pipeline's
data/raw/ (as ToTensor would make them: pixels / 255), and torch.manual_seed(seed) comes first.
It prints each seed's test accuracy after every epoch, then the mean, standard deviation and
range of the last epoch's: the yardstick for the pipeline's default run (docs/techniques.md "Results").
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

RAW = Path("data/raw")


class Net(nn.Module):  # the source's network
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.load(RAW / f"{split}_images.npy")).float() / 255
    return images, torch.from_numpy(np.load(RAW / f"{split}_labels.npy")).long()


def main() -> None:
    seeds = [int(s) for s in sys.argv[1:]] or list(range(10))
    train_x, train_y = load("train")
    test_x, test_y = load("test")
    final = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = Net()
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        loader = DataLoader(TensorDataset(train_x, train_y), batch_size=100, shuffle=True)
        accuracies = []
        for _epoch in range(10):
            for inputs, labels in loader:
                optimizer.zero_grad()
                loss = criterion(model(inputs), labels)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                accuracies.append((model(test_x).argmax(1) == test_y).float().mean().item())
        final.append(accuracies[-1])
        print(
            f"seed {seed}: test accuracy by epoch " + " ".join(f"{a:.3f}" for a in accuracies),
            flush=True,
        )
    if len(final) > 1:
        print(
            f"last epoch, {len(final)} seeds: mean {100 * statistics.mean(final):.1f}%, "
            f"std {100 * statistics.stdev(final):.1f}, range {100 * min(final):.1f}–{100 * max(final):.1f}%"
        )


if __name__ == "__main__":
    main()
