"""The data set as in-memory tensors, and augmentation on whole batches.

Images stay uint8 NCHW tensors (50,000 CIFAR images are 150 MB) and become float only batch by
batch, so no epoch ever touches PIL or a per-sample transform. Augmentation draws one random
choice per image but works on the whole tensor at once, airbench-style: pad once, crop by
gathering shifted rows and columns, flip with a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages import io as sio


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N×3×H×W, int64 labels N) from `<folder>/<split>_images.npy`."""
    images = torch.from_numpy(sio.load_array(Path(folder) / f"{split}_images.npy"))
    labels = torch.from_numpy(sio.load_array(Path(folder) / f"{split}_labels.npy"))
    return images, labels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [0, 1], the source's ToTensor scaling."""
    return images.float().div_(255)


@dataclass(frozen=True)
class Policy:
    """The training augmentation: which random transforms, with which strengths."""

    flip: bool = False  # horizontal flip with probability 0.5
    crop_padding: int = 0  # pixels of zero padding around the image before a random crop

    @classmethod
    def from_params(cls, augment) -> "Policy":
        return cls(flip=augment.flip, crop_padding=augment.crop_padding)

    @property
    def active(self) -> bool:
        return self.flip or self.crop_padding > 0


def augment(images: torch.Tensor, policy: Policy, generator: torch.Generator) -> torch.Tensor:
    """A new tensor: each image randomly cropped and flipped. Labels are unchanged by design."""
    if policy.crop_padding > 0:
        images = random_crop(images, policy.crop_padding, generator)
    if policy.flip:
        images = random_flip(images, generator)
    return images


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) per image, done for the whole batch at once."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros, like RandomCrop
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    # Gather rows first, then columns: two cheap index_select-like gathers instead of 81 slices.
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, padded.shape[1], h, padded.shape[3])
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, padded.shape[1], h, w)
    return out.gather(3, cols)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stream): epochs can be replayed exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)
