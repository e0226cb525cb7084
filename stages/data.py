"""The data set as in-memory tensors, and augmentation on whole batches.

Images stay uint8 NCHW tensors (50,000 CIFAR images are 150 MB) and become float only batch by
batch, so no epoch ever touches PIL or a per-sample transform. Augmentation draws one random
choice per image but works on groups of images at once: crop and flip move whole shifted
slices of the images that drew the same offset. Random draws come from a CPU generator
whatever the device, so an epoch's augmentation is the same on a GPU as on a CPU; the pixels
are transformed where they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages import io as sio


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N×3×H×W, int64 labels N) from `<folder>/<split>_images.npy`."""
    images = torch.from_numpy(sio.load_array(Path(folder) / f"{split}_images.npy"))
    labels = torch.from_numpy(sio.load_array(Path(folder) / f"{split}_labels.npy"))
    return images, labels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [0, 1], the source's ToTensor scaling. Float tensors are inputs
    already (the feature cache's, stages/networks/feature_cache.py) and pass unchanged."""
    if images.is_floating_point():
        return images
    return images.float().div_(255)


@dataclass(frozen=True)
class Policy:
    """The training augmentation: which random transforms, with which strengths."""

    flip: bool = False  # horizontal flip with probability 0.5
    crop_padding: int = 0  # pixels of zero padding around the image before a random crop
    trivial_augment: bool = False  # TrivialAugmentWide: one random op, random strength, per image
    color_jitter: float = 0.0  # brightness, contrast and saturation factors drawn from [1-s, 1+s]
    erasing: float = 0.0  # probability of erasing one random rectangle per image
    # RandomResizedCrop: the crop's share of the image's area, [lo, hi]; None = off
    resized_crop_scale: tuple[float, float] | None = None
    resized_crop_ratio: tuple[float, float] = (0.75, 1.333)  # the crop's width / height

    @classmethod
    def from_params(cls, augment) -> Policy:
        scale = augment.resized_crop_scale
        return cls(
            resized_crop_scale=tuple(scale) if scale is not None else None,
            resized_crop_ratio=tuple(augment.resized_crop_ratio),
            flip=augment.flip,
            crop_padding=augment.crop_padding,
            trivial_augment=augment.trivial_augment,
            color_jitter=augment.color_jitter,
            erasing=augment.erasing,
        )

    @property
    def active(self) -> bool:
        return self != Policy()


def augment(images: torch.Tensor, policy: Policy, generator: torch.Generator) -> torch.Tensor:
    """A new uint8 tensor, each image transformed with its own random draw. Labels don't change."""
    if policy.resized_crop_scale is not None:  # first, as in torchvision's ImageNet recipe
        images = random_resized_crop(
            images, policy.resized_crop_scale, policy.resized_crop_ratio, generator
        )
    if policy.crop_padding > 0:  # the crop and the flip in one pass over the pixels
        images = crop_and_flip(images, policy.crop_padding, policy.flip, generator)
    elif policy.flip:
        images = random_flip(images, generator)
    if policy.trivial_augment:
        images = trivial_augment(images, generator)
    if policy.color_jitter > 0:
        images = color_jitter(images, policy.color_jitter, generator)
    if policy.erasing > 0:
        images = random_erasing(images, policy.erasing, generator)
    return images


def crop_and_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """RandomCrop(size, padding) and then, with `flip`, RandomHorizontalFlip(0.5), per image.

    The draws, in this order: row offsets and column offsets (n each, uniform in 0..2·padding),
    then with `flip` n uniforms (< 0.5 flips). The pixels move as whole shifted slices rather than
    one by one through index tensors: the images that drew the same (row offset, column offset,
    flip) form a group, a few hundred images of 50,000 for 4 pixels of padding; each group is
    gathered as whole images, shifted by one slice copy onto zeros, mirrored if it drew the flip,
    and put back in place. Groups are small enough to stay in the CPU's cache, and the result
    is one new tensor: every pixel is a plain copy, the same whatever order the work is done in.
    """
    n, _, h, w = images.shape
    p, k = padding, 2 * padding + 1
    dy = torch.randint(0, k, (n,), generator=generator)
    dx = torch.randint(0, k, (n,), generator=generator)
    flipped = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    key = (flipped.long() * k + dy) * k + dx
    order = torch.argsort(key, stable=True).to(images.device)
    counts = torch.bincount(key, minlength=2 * k * k).tolist()
    out = torch.empty_like(images)
    # scratch space for one group, reused: fresh allocations would cost a page fault per 4 kB
    most = max(counts)
    block, shifted, mirrored = (images.new_empty((most, *images.shape[1:])) for _ in range(3))
    reverse = torch.arange(w - 1, -1, -1, device=images.device)
    start = 0
    for group, count in enumerate(counts):
        if not count:
            continue
        idx, start = order[start : start + count], start + count
        oy, ox = (group // k) % k - p, group % k - p  # the window's offset in the image
        rows, cols = slice(max(0, oy), min(h, h + oy)), slice(max(0, ox), min(w, w + ox))
        torch.index_select(images, 0, idx, out=block[:count])
        moved = shifted[:count].zero_()
        if rows.start < rows.stop and cols.start < cols.stop:  # else the window is all padding
            to_rows = slice(rows.start - oy, rows.stop - oy)
            to_cols = slice(cols.start - ox, cols.stop - ox)
            moved[:, :, to_rows, to_cols] = block[:count, :, rows, cols]
        if group >= k * k:
            moved = torch.index_select(moved, 3, reverse, out=mirrored[:count])
        out.index_copy_(0, idx, moved)
    return out


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    tries: int = 10,
) -> torch.Tensor:
    """n crop boxes (left, top, right, bottom; pixels) drawn as v2.RandomResizedCrop draws one.

    Per image: up to `tries` (area share uniform in `scale`, aspect ratio log-uniform in
    `ratio`); the first that fits the image wins, at a uniform position; if none fits, the
    centre crop closest to the ratio limits. The tries are drawn for every image at once (the
    draws, in this order: n×tries area shares, n×tries log-ratios, n tops, n lefts), so an image
    draws the same numbers however many tries it needed.
    """
    area = height * width * torch.empty(n, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    w = (area * log_ratio.exp()).sqrt().round()
    h = (area / log_ratio.exp()).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 if none does)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = (torch.rand(n, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).floor()
    # no try fits: torchvision's centre crop, the whole image cut to the nearest allowed ratio
    if width / height < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    none_fits = ~fits.any(1)
    w[none_fits], h[none_fits] = fw, fh
    top[none_fits], left[none_fits] = (height - fh) // 2, (width - fw) // 2
    return torch.stack([left, top, left + w, top + h], dim=1)


def random_resized_crop(
    images: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    chunk: int = 4096,
) -> torch.Tensor:
    """RandomResizedCrop(image size, scale, ratio) per image: one box per image (crop_boxes),
    resized back to the image's size by torchvision.ops.roi_align, bilinear, whole batches at a
    time. With aligned=True a box (0, 0, W, H) samples every pixel at its own centre: the
    identity. Crops are never larger than the image, so one sample per output pixel
    (sampling_ratio=1) is plain bilinear upsampling, as torchvision's resize does it."""
    from torchvision.ops import roi_align  # imported when used: torchvision costs seconds

    n, _, h, w = images.shape
    boxes = crop_boxes(n, h, w, scale, ratio, generator).to(images.device)
    out = torch.empty_like(images)
    for start in range(0, n, chunk):  # float copies of `chunk` images at a time (48 MB at 32 px)
        x = images[start : start + chunk].float()
        part = boxes[start : start + chunk]
        rois = torch.cat([torch.arange(len(part), device=x.device)[:, None].float(), part], 1)
        resized = roi_align(x, rois, (h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def trivial_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide (Müller & Hutter, 2021) with one draw per image, applied group-wise.

    v2.TrivialAugmentWide draws one (op, magnitude) for everything it is given, so calling it on a
    batch would transform every image alike. Here each image draws its own op, magnitude bin and
    sign from `generator`; the images that drew the same triple go through the op together
    (torchvision.transforms.v2.functional's, with v2.TrivialAugmentWide's arguments), so the work
    is a few hundred batched calls per epoch, not one call per image.
    """
    ops = trivial_augment_wide_ops()
    bins = TRIVIAL_AUGMENT_BINS
    n = images.shape[0]
    op = torch.randint(len(ops), (n,), generator=generator)
    level = torch.randint(bins, (n,), generator=generator)
    negative = torch.rand(n, generator=generator) < 0.5
    out = images.clone()
    keys = op * 2 * bins + level * 2 + negative.long()
    for key in torch.unique(keys).tolist():
        which = (keys == key).to(images.device)
        _, magnitudes, signed, apply = ops[key // (2 * bins)]
        magnitude = 0.0 if magnitudes is None else float(magnitudes[(key // 2) % bins])
        if signed and key % 2:
            magnitude = -magnitude
        out[which] = apply(images[which], magnitude)
    return out


TRIVIAL_AUGMENT_BINS = 31  # v2.TrivialAugmentWide's num_magnitude_bins


def trivial_augment_wide_ops() -> list[tuple[str, torch.Tensor | None, bool, Callable]]:
    """TrivialAugmentWide's augmentation space, in v2.TrivialAugmentWide's order (an image's op
    draw indexes it): (name, the magnitude of each bin or None, whether the magnitude takes a
    random sign, the op on a uint8 batch). Nearest-neighbour geometry filled with zeros, and
    the shears about the top-left corner, as torchvision does it; torchvision keeps this table
    private, so it is written out here with its public functional ops, and a test checks that
    every output of v2.TrivialAugmentWide is one of this table's."""
    from torchvision.transforms.v2 import InterpolationMode, functional as F

    bins, nearest = TRIVIAL_AUGMENT_BINS, InterpolationMode.NEAREST

    def up_to(top: float) -> torch.Tensor:
        return torch.linspace(0.0, top, bins)

    def shear(x: torch.Tensor, degrees_x: float, degrees_y: float) -> torch.Tensor:
        return F.affine(
            x,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[degrees_x, degrees_y],
            interpolation=nearest,
            fill=None,
            center=[0, 0],
        )

    def translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
        return F.affine(
            x,
            angle=0.0,
            translate=[dx, dy],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=nearest,
            fill=None,
        )

    return [
        ("Identity", None, False, lambda x, m: x),
        ("ShearX", up_to(0.99), True, lambda x, m: shear(x, math.degrees(math.atan(m)), 0.0)),
        ("ShearY", up_to(0.99), True, lambda x, m: shear(x, 0.0, math.degrees(math.atan(m)))),
        ("TranslateX", up_to(32.0), True, lambda x, m: translate(x, int(m), 0)),
        ("TranslateY", up_to(32.0), True, lambda x, m: translate(x, 0, int(m))),
        (
            "Rotate",
            up_to(135.0),
            True,
            lambda x, m: F.rotate(x, m, interpolation=nearest, fill=None),
        ),
        ("Brightness", up_to(0.99), True, lambda x, m: F.adjust_brightness(x, 1.0 + m)),
        ("Color", up_to(0.99), True, lambda x, m: F.adjust_saturation(x, 1.0 + m)),
        ("Contrast", up_to(0.99), True, lambda x, m: F.adjust_contrast(x, 1.0 + m)),
        ("Sharpness", up_to(0.99), True, lambda x, m: F.adjust_sharpness(x, 1.0 + m)),
        (
            "Posterize",
            (8 - (torch.arange(bins) / ((bins - 1) / 6))).round().int(),  # 8 bits down to 2
            False,
            lambda x, m: F.posterize(x, int(m)),
        ),
        ("Solarize", torch.linspace(1.0, 0.0, bins), False, lambda x, m: F.solarize(x, 255 * m)),
        ("AutoContrast", None, False, lambda x, m: F.autocontrast(x)),
        ("Equalize", None, False, lambda x, m: F.equalize(x)),
    ]


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation, each factor uniform in [1-s, 1+s]."""
    from torchvision.transforms import v2

    n = images.shape[0]

    def factors() -> torch.Tensor:
        drawn = 1 + strength * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        return drawn.clamp(min=0).to(images.device)

    x = images.float() / 255
    x = (x * factors()).clamp(0, 1)  # brightness: scale towards black
    mean = v2.functional.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factors() + mean).clamp(0, 1)  # contrast: blend with the mean grey
    gray = v2.functional.rgb_to_grayscale(x)
    x = ((x - gray) * factors() + gray).clamp(0, 1)  # saturation: blend with the grey image
    return (x * 255).round().to(torch.uint8)


def random_erasing(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0), one rectangle per image."""
    n, _, h, w = images.shape
    erase = torch.rand(n, generator=generator) < p
    area = 0.02 + 0.31 * torch.rand(n, generator=generator)
    log_ratio = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(n, generator=generator)
    eh = (area * log_ratio.exp()).sqrt().mul(h).round().clamp(1, h).long()
    ew = (area / log_ratio.exp()).sqrt().mul(w).round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # n × h
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # n × w
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None]
    return images.masked_fill(mask.to(images.device), 0)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stream): epochs can be replayed exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)
