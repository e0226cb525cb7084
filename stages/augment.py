"""Stage `augment`: split, subset and (optionally) augmented copies → data/prepared/.

Reads params: seed, data.val_fraction, data.train_size, data.imbalance_ratio, augment.*.

1. A seeded, stratified train/validation split of the training images (data.val_fraction): the
   test images stay untouched in data/raw/ for the evaluate stage.
2. An optional stratified subset of what is left for training (data.train_size): the small-data
   regime in which overfitting shows; then, optionally, a long-tailed version of it
   (data.imbalance_ratio).
3. augment.copies > 0 appends that many augmented copies of every training image (offline,
   versioned data). augment.online applies the same policy to each batch during training instead.
4. reports/augment_preview.png shows originals beside augmented versions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from stages import errors, io as sio, params as P
from stages.data import Policy, augment, epoch_generator
from stages.errors import StageError

RAW = Path("data/raw")
OUT = Path("data/prepared")
PREVIEW = Path("reports/augment_preview.png")


def main() -> None:
    params = P.load()
    images = sio.load_array(RAW / "train_images.npy")
    labels = sio.load_array(RAW / "train_labels.npy")
    raw_meta = sio.read_json(RAW / "meta.json")
    classes = raw_meta["classes"]

    train_idx, val_idx = stratified_split(labels, params.data.val_fraction, params.seed)
    warning = small_validation_warning(labels[val_idx], len(classes), params.data.val_fraction)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if params.data.train_size is not None:
        if params.data.train_size > len(train_idx):
            raise StageError(
                f"data.train_size = {params.data.train_size} is larger than the training set "
                f"({len(train_idx)} images after holding out data.val_fraction = "
                f"{params.data.val_fraction} for validation)"
            )
        train_idx = stratified_subset(labels, train_idx, params.data.train_size, params.seed)
    if params.data.imbalance_ratio > 1:
        train_idx = long_tailed(labels, train_idx, params.data.imbalance_ratio, params.seed)

    train_x, train_y = images[train_idx], labels[train_idx]
    policy = Policy.from_params(params.augment)
    copies = [torch.from_numpy(train_x)]
    for k in range(1, params.augment.copies + 1):
        copies.append(augment(copies[0], policy, epoch_generator(params.seed, 0, stream=1000 + k)))
    train_x = torch.cat(copies).numpy()
    train_y = np.tile(train_y, params.augment.copies + 1)

    sio.save_array(OUT / "train_images.npy", train_x)
    sio.save_array(OUT / "train_labels.npy", train_y)
    sio.save_array(OUT / "val_images.npy", images[val_idx])
    sio.save_array(OUT / "val_labels.npy", labels[val_idx])
    sio.write_json(
        OUT / "meta.json",
        {
            "classes": classes,
            "source_sha256": raw_meta["sha256"],
            "train_count": len(train_y),
            "train_originals": len(train_idx),
            "val_count": len(val_idx),
            "train_per_class": np.bincount(train_y, minlength=len(classes)).tolist(),
            "val_per_class": np.bincount(labels[val_idx], minlength=len(classes)).tolist(),
        },
    )
    save_preview(images[train_idx[:8]], policy, params.seed)
    print(
        f"augment: {len(train_y)} training images ({len(train_idx)} originals, "
        f"{params.augment.copies} augmented copies each), {len(val_idx)} validation images"
    )


def small_validation_warning(val_labels: np.ndarray, num_classes: int, val_fraction: float):
    """A line for a validation split too small to choose with (every choice "on validation"
    rests on it): under 20 images in some class; else None. (A total floor would ask a small set
    of few classes to hold out half its images.)"""
    per_class = np.bincount(val_labels, minlength=num_classes)
    if per_class.min() >= 20:
        return None
    return (
        f"warning (augment): the validation split holds {len(val_labels)} images "
        f"({per_class.min()} in its smallest class), too few to choose with: raise "
        f"data.val_fraction (now {val_fraction}) to hold out at least 20 images per class"
    )


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int):
    """Sorted (train indices, validation indices), the same share of each class held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_subset(labels: np.ndarray, indices: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` of `indices`, each class keeping its share (largest remainders get the leftovers)."""
    rng = np.random.default_rng(seed + 1)
    classes, counts = np.unique(labels[indices], return_counts=True)
    exact = counts * size / counts.sum()
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: size - quota.sum()]:
        quota[i] += 1
    chosen = [
        rng.permutation(indices[labels[indices] == cls])[:q] for cls, q in zip(classes, quota)
    ]
    return np.sort(np.concatenate(chosen))


def long_tailed(labels: np.ndarray, indices: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Class k of K keeps n_max * ratio^(-k/(K-1)) images: the first class keeps n_max (the size
    of the smallest class), the last n_max / ratio. A long tail, as in Cui et al. (2019)."""
    rng = np.random.default_rng(seed + 2)
    classes, counts = np.unique(labels[indices], return_counts=True)
    n_max = counts.min()
    kept = []
    for k, cls in enumerate(classes):
        n = max(1, int(round(n_max * ratio ** (-k / max(1, len(classes) - 1)))))
        kept.append(rng.permutation(indices[labels[indices] == cls])[:n])
    return np.sort(np.concatenate(kept))


def save_preview(originals: np.ndarray, policy: Policy, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = 4
    x = torch.from_numpy(originals)
    augmented = [
        augment(x, policy, epoch_generator(seed, 0, stream=2000 + v)) for v in range(versions)
    ]
    fig, axes = plt.subplots(
        len(x), versions + 1, figsize=(1.3 * (versions + 1), 1.3 * len(x)), squeeze=False
    )
    for row in range(len(x)):
        for col, batch in enumerate([x] + augmented):
            ax = axes[row][col]
            ax.imshow(batch[row].permute(1, 2, 0).numpy())
            ax.set_axis_off()
            if row == 0:
                ax.set_title("original" if col == 0 else f"augmented {col}", fontsize=7)
    note = "" if policy.active else " (augmentation is off: all versions equal the original)"
    crop = (
        f", resized_crop_scale={list(policy.resized_crop_scale)}"
        if policy.resized_crop_scale
        else ""
    )
    fig.suptitle(f"flip={policy.flip}, crop_padding={policy.crop_padding}{crop}{note}", fontsize=7)
    fig.tight_layout()
    sio.save_figure(PREVIEW, fig)
    plt.close(fig)


if __name__ == "__main__":
    errors.run(main)
