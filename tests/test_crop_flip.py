"""The crop + flip by shifted slices (stages/data.py) against the implementation it replaced,
kept here as the reference: the same random draws must give bit-identical images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.data import Policy, augment, crop_and_flip, epoch_generator


def reference_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """The former random_crop: pad, then gather rows and columns through int64 indices."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
    arange = lambda k: torch.arange(k, device=images.device)
    rows = (dy[:, None] + arange(h))[:, None, :, None].expand(
        n, padded.shape[1], h, padded.shape[3]
    )
    out = padded.gather(2, rows)
    cols = (dx[:, None] + arange(w))[:, None, None, :].expand(n, padded.shape[1], h, w)
    return out.gather(3, cols)


def reference_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("padding", [1, 2, 4, 6])
@pytest.mark.parametrize("flip", [False, True])
def test_same_images_as_the_gathering_implementation(seed, padding, flip):
    g = torch.Generator().manual_seed(1000 + seed)
    images = torch.randint(0, 256, (257, 3, 12, 10), dtype=torch.uint8, generator=g)
    ref_gen, new_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    expected = reference_crop(images, padding, ref_gen)
    if flip:
        expected = reference_flip(expected, ref_gen)
    got = crop_and_flip(images, padding, flip, new_gen)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, expected)
    # the generator ends in the same state: later draws (trivial augment, ...) are unchanged
    assert torch.equal(ref_gen.get_state(), new_gen.get_state())


def test_augment_and_the_crop_alone_match_the_reference():
    images = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8)
    policy = Policy(flip=True, crop_padding=4, erasing=0.5)
    ref_gen = epoch_generator(3, 5)
    expected = reference_flip(reference_crop(images, 4, ref_gen), ref_gen)
    expected = augment(expected, Policy(erasing=0.5), ref_gen)
    assert torch.equal(augment(images, policy, epoch_generator(3, 5)), expected)
    assert torch.equal(
        crop_and_flip(images, 4, False, torch.Generator().manual_seed(9)),
        reference_crop(images, 4, torch.Generator().manual_seed(9)),
    )


def test_padding_larger_than_the_image():
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    ref_gen, new_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    expected = reference_flip(reference_crop(images, 6, ref_gen), ref_gen)
    assert torch.equal(crop_and_flip(images, 6, True, new_gen), expected)
