"""The augment stage: split, subset, offline copies; and the batched augmentation itself."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, write_params

from stages import augment as augment_stage, download, io as sio, params as P, train
from stages.data import Policy, augment, crop_and_flip, crop_boxes, epoch_generator
from stages.errors import ParamsError, StageError


def prepare(workdir, **overrides) -> dict:
    write_params(workdir, **overrides)
    if not (workdir / "data/raw").exists():
        download.main()
    augment_stage.main()
    return {p.stem: np.load(p) for p in (workdir / "data/prepared").glob("*.npy")}


def test_split_is_stratified_and_disjoint(workdir, pickle_archive):
    out = prepare(workdir, **{"data.source": str(pickle_archive), "data.val_fraction": 0.2})
    assert np.bincount(out["val_labels"]).tolist() == [6, 6, 6]
    assert np.bincount(out["train_labels"]).tolist() == [24, 24, 24]
    raw = np.load(workdir / "data/raw/train_images.npy").reshape(90, -1)
    train_rows = {r.tobytes() for r in out["train_images"].reshape(72, -1)}
    val_rows = {r.tobytes() for r in out["val_images"].reshape(18, -1)}
    assert not train_rows & val_rows
    assert train_rows | val_rows == {r.tobytes() for r in raw}


def test_split_depends_on_seed_only(workdir, pickle_archive):
    a = prepare(workdir, **{"data.source": str(pickle_archive), "seed": 1})
    b = prepare(workdir, **{"data.source": str(pickle_archive), "seed": 1})
    c = prepare(workdir, **{"data.source": str(pickle_archive), "seed": 2})
    assert np.array_equal(a["val_images"], b["val_images"])
    assert not np.array_equal(a["val_images"], c["val_images"])


def test_train_size_subset_is_stratified(workdir, pickle_archive):
    out = prepare(
        workdir,
        **{"data.source": str(pickle_archive), "data.val_fraction": 0.2, "data.train_size": 31},
    )
    counts = np.bincount(out["train_labels"]).tolist()
    assert sum(counts) == 31 and max(counts) - min(counts) <= 1
    assert len(out["val_labels"]) == 18  # the validation set does not shrink with the subset


def test_train_size_larger_than_data_is_a_clear_error(workdir, pickle_archive):
    with pytest.raises(
        StageError, match=r"data.train_size = 500 is larger than the training set \(72 images"
    ):
        prepare(
            workdir,
            **{
                "data.source": str(pickle_archive),
                "data.val_fraction": 0.2,
                "data.train_size": 500,
            },
        )


@pytest.mark.parametrize(
    "policy",
    [{"augment.flip": True, "augment.crop_padding": 4}, {"augment.resized_crop_scale": [0.3, 0.5]}],
)
def test_offline_copies(workdir, pickle_archive, policy):
    out = prepare(
        workdir,
        **{
            "data.source": str(pickle_archive),
            "data.val_fraction": 0.2,
            "augment.copies": 2,
            **policy,
        },
    )
    n = 72
    assert out["train_images"].shape[0] == 3 * n
    assert np.array_equal(out["train_labels"][:n], out["train_labels"][n : 2 * n])
    assert not np.array_equal(out["train_images"][:n], out["train_images"][n : 2 * n])
    assert not np.array_equal(out["train_images"][n : 2 * n], out["train_images"][2 * n :])
    assert (workdir / "reports/augment_preview.png").stat().st_size > 1000


def test_crop_takes_a_window_of_the_zero_padded_image():
    images = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = crop_and_flip(images, 2, False, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert out.shape == images.shape and out.dtype == torch.uint8
    offsets = set()
    for i in range(len(images)):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])
        ]
        assert windows, f"image {i} is not a crop of its padded version"
        offsets.add(windows[0])
    assert len(offsets) > 10  # one random offset per image, not one for the whole batch


def test_flip_mirrors_about_half_the_images():
    images = torch.randint(0, 255, (400, 3, 8, 8), dtype=torch.uint8)
    out = augment(images, Policy(flip=True), torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(400)]
    kept = [torch.equal(out[i], images[i]) for i in range(400)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 150 < sum(flipped) < 250


def test_augmentation_is_reproducible_and_differs_between_epochs():
    images = torch.randint(0, 255, (50, 3, 16, 16), dtype=torch.uint8)
    policy = Policy(flip=True, crop_padding=4)
    epoch1 = augment(images, policy, epoch_generator(seed=0, epoch=1))
    again = augment(images, policy, epoch_generator(seed=0, epoch=1))
    epoch2 = augment(images, policy, epoch_generator(seed=0, epoch=2))
    assert torch.equal(epoch1, again)
    assert not torch.equal(epoch1, epoch2)


def test_no_policy_is_the_identity():
    images = torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment(images, Policy(), torch.Generator()), images)


def test_online_augmentation_is_what_changes_training(workdir, pickle_archive, monkeypatch):
    """The image policy reaches training only with augment.online; then every epoch sees a new
    augmented copy of each image, and a progress bar shows each epoch on a terminal."""
    source = {"data.source": str(pickle_archive)}
    policy = {"augment.flip": True, "augment.crop_padding": 4}
    write_params(workdir, **{**TINY, **source, **policy})
    download.main()
    augment_stage.main()  # no offline copies: the prepared data are the same with or without a policy

    def weights(**overrides):
        write_params(workdir, **{**TINY, **source, **overrides})
        train.main()
        return sio.load_torch(workdir / "models/model.pt")["state_dict"]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = weights()
    offline_policy = weights(**policy)  # online is off: the policy must not touch training
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    online = weights(**policy, **{"augment.online": True})
    assert all(torch.equal(plain[k], offline_policy[k]) for k in plain)
    assert not all(torch.equal(plain[k], online[k]) for k in plain)
    bars = terminal.getvalue()
    assert "epoch 1/2" in bars and "epoch 2/2" in bars and "it/s" in bars


def test_resized_crop_is_reproducible_and_keeps_shape_and_range():
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    policy = Policy(resized_crop_scale=(0.35, 1.0))
    out = augment(images, policy, epoch_generator(seed=0, epoch=1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(images, policy, epoch_generator(seed=0, epoch=1)))
    assert not torch.equal(out, augment(images, policy, epoch_generator(seed=0, epoch=2)))
    assert not torch.equal(out, images)
    # each image is a magnified part of itself: a crop of a smooth gradient stays within its range
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).expand(40, 3, 16, 16).contiguous()
    cropped = augment(ramp, policy, torch.Generator().manual_seed(0))
    assert (cropped[..., 1:] >= cropped[..., :-1]).all()  # still increasing left to right


def test_resized_crop_params_reach_the_policy():
    """train (online) and augment (offline copies) both build their policy with from_params."""
    augment_params = P.parse(
        {"augment": {"resized_crop_scale": [0.35, 1], "resized_crop_ratio": [0.5, 2]}}
    ).augment
    policy = Policy.from_params(augment_params)
    assert policy.resized_crop_scale == (0.35, 1.0) and policy.resized_crop_ratio == (0.5, 2.0)
    assert policy.active and not Policy.from_params(P.parse({}).augment).active


def test_resized_crop_of_the_whole_image_is_the_identity():
    images = torch.randint(0, 256, (20, 3, 12, 10), dtype=torch.uint8)
    policy = Policy(resized_crop_scale=(1.0, 1.0), resized_crop_ratio=(1.0, 1.0))
    out = augment(images, policy, torch.Generator().manual_seed(0))  # square ratio, 12×10 image:
    assert not torch.equal(out, images)  # no try fits, the centre 10×10 crop is upsampled
    square = images[..., :10, :]
    out = augment(square, policy, torch.Generator().manual_seed(0))
    assert torch.equal(out, square)


@pytest.mark.parametrize("scale, ratio", [((0.35, 1.0), (0.75, 1.333)), ((0.08, 0.2), (0.5, 2.0))])
def test_resized_crop_boxes_follow_the_scale_and_ratio_limits(scale, ratio):
    boxes = crop_boxes(2000, 32, 32, scale, ratio, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    # the drawn area and ratio are rounded to whole pixels: allow half a pixel on each side
    area = w * h / 32**2
    assert (area >= scale[0] * 0.8).all() and (area <= scale[1] + 0.05).all()
    assert (area.max() - area.min()) > 0.5 * (scale[1] - scale[0])  # the whole range is used
    aspect = w / h
    assert (aspect >= ratio[0] * 0.85).all() and (aspect <= ratio[1] * 1.18).all()
    assert len(set(boxes[:, 0].tolist())) > 5  # positions vary too


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resized_crop_scale": [0.8, 0.3]}, "resized_crop_scale = \\[0.8, 0.3\\]: .*0 < lo <= hi"),
        ({"resized_crop_scale": [0.0, 1.0]}, "resized_crop_scale = \\[0.0, 1.0\\]"),
        ({"resized_crop_scale": [0.5, 1.5]}, "resized_crop_scale = \\[0.5, 1.5\\]"),
        ({"resized_crop_scale": [0.5]}, "resized_crop_scale = \\[0.5\\]"),
        (
            {"resized_crop_scale": [0.5, 1], "resized_crop_ratio": [0, 1]},
            "resized_crop_ratio = \\[0, 1\\]",
        ),
        ({"resized_crop_ratio": [0.5, 2.0]}, "resized crop, which is off"),
    ],
)
def test_resized_crop_refuses_values_that_mean_nothing(change, message):
    with pytest.raises(ParamsError, match=message) as caught:
        P.parse({"augment": change})
    assert "\n" not in str(caught.value)


def test_a_validation_split_too_small_to_choose_with_is_a_warning_naming_val_fraction(
    workdir, capsys
):
    warn = augment_stage.small_validation_warning
    assert warn(np.repeat(np.arange(10), 20), 10, 0.02) is None
    few = warn(np.repeat(np.arange(3), 3), 3, 0.02)  # 450 images of 3 classes, 2% held out
    assert few.startswith("warning (augment): the validation split holds 9 images")
    assert "data.val_fraction (now 0.02)" in few
    assert warn(np.repeat(np.arange(3), [30, 30, 19]), 3, 0.1)  # one class of 19
    download.main()
    augment_stage.main()  # the tests' tiny data: a few validation images
    assert "warning (augment): the validation split holds" in capsys.readouterr().err
