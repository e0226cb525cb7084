"""The networks trained from scratch: the source's `net`, a configurable `cnn`, `resnet9`.

`net` is exactly the source document's network: conv 3→6 (5×5), max-pool 2, conv 6→16 (5×5),
max-pool 2, fully connected 400→120→84→classes, ReLU. It expects 32×32 inputs. `cnn` is a plain
configurable CNN for the model-size study: depth, width, batch norm. `resnet9` is the network of
the fast GPU preset (stages/experiments/presets/fast-gpu.yaml). They take [0, 1] pixels with no
normalization of their own (data.normalize adds one) and have no pretrained weights.

Each network lists its `blocks()` in forward order (what model.freeze = all_but_last_<N> cuts)
and its `layers()`: its forward pass as a sequence of its own modules, which the feature cache
splits. Their entries in registry.py name their heads and read these.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """The source network. width scales every layer; dropout layers exist only when p > 0, so the
    defaults build exactly the source's modules (and the same initialization under a seed)."""

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
    ):
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

    def blocks(self) -> list[list[nn.Module]]:
        """The network without its head, in forward order: what model.freeze cuts."""
        return [[self.conv1], [self.conv2], [self.fc1], [self.fc2]]

    def layers(self) -> list[nn.Module]:
        """forward() as a sequence of modules: nn.Sequential(*self.layers()) is self."""
        return [
            *(self.conv1, nn.ReLU(), self.pool, self.conv_drop),
            *(self.conv2, nn.ReLU(), self.pool, self.conv_drop),
            nn.Flatten(),
            *(self.fc1, nn.ReLU(), self.drop, self.fc2, nn.ReLU(), self.drop),
            self.fc3,
        ]


class CNN(nn.Module):
    """depth blocks of 3×3 conv (32·width·2^i channels), [batch norm], ReLU, max-pool 2,
    [spatial dropout]; then global average pooling, [dropout] and one dense layer."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 3,
        width: float = 1.0,
        batch_norm: bool = False,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(depth):
            out = max(1, round(32 * width * 2**i))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            # Identity when off, so that the state dict's keys don't depend on dropout.
            layers += [
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout2d(conv_dropout) if conv_dropout else nn.Identity(),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            nn.Linear(channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def blocks(self) -> list[list[nn.Module]]:
        """A block per conv: the conv and its batch norm."""
        found: list[list[nn.Module]] = []
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                found.append([])
            found[-1].append(layer)
        return found

    def layers(self) -> list[nn.Module]:
        return [*self.features, *self.head]


class ResNet9(nn.Module):
    """The small residual network of the fast CIFAR-10 trainers (Myrtle.ai's DAWNBench entry,
    94% in 24 epochs): a 64-channel conv, then three stages of conv-BN-ReLU-max-pool at 128, 256
    and 512 channels, the first and the last followed by a residual block of two such convs;
    global max-pool and one dense layer, whose logits are scaled by 1/8 (softer at the start)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c0, c1, c2, c3 = (max(1, round(n * width)) for n in (64, 128, 256, 512))

        def conv_bn(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

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

    def blocks(self) -> list[list[nn.Module]]:
        return [[self.prep], [self.layer1], [self.res1], [self.layer2], [self.layer3], [self.res3]]

    def layers(self) -> list[nn.Module]:
        return [
            *(self.prep, self.layer1, Residual(self.res1), self.layer2, self.layer3),
            Residual(self.res3),
            GlobalMaxPool(),
            self.fc,
            Scale(0.125),
        ]


class Residual(nn.Module):
    """x + module(x): a skip connection of forward() as a module of layers()."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


class GlobalMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=(2, 3))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor
