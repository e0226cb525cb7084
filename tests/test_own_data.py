"""docs/data.md's recipe for a small data set of one's own, measured here on a synthetic folder:
3 classes of 150 training images (a stripe direction each, under noise and random colours)."""

from __future__ import annotations

import json

import numpy as np
from conftest import write_params
from PIL import Image

from stages import augment, download, evaluate, train

RECIPE = {
    "data.val_fraction": 0.2,  # 30 images per class to choose with, not 3
    "data.normalize": "dataset",
    "model.name": "cnn",  # a small network for a small set; net overfits or sits at chance
    "model.batch_norm": True,
    "train.optimizer": "adam",
    "train.lr": 0.001,
    "train.epochs": 30,
    "mlflow.experiment": "my-photos",  # its own list in the MLflow UI
}


def stripes(kind: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Horizontal, vertical or diagonal stripes of a random period, phase and colour, in noise."""
    y, x = np.mgrid[:size, :size]
    period, phase = rng.uniform(4, 9), rng.uniform(0, 2 * np.pi)
    along = (y, x, x + y)[kind]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase)
    colour = rng.uniform(0.2, 1.0, 3)
    image = wave[..., None] * colour + rng.normal(0, 0.9, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_folder(root, train_per_class=150, test_per_class=50, seed=0):
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind, name in enumerate(["horizontal", "vertical", "diagonal"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(stripes(kind, rng)).save(folder / f"{i}.png")
    return root


def run_pipeline(workdir, source, **changes) -> tuple[float, float]:
    write_params(workdir, **{"data.source": str(source), "data.sha256": None, **changes})
    for stage in (download, augment, train, evaluate):
        stage.main()
    val = json.loads((workdir / "metrics/train.json").read_text())["val_accuracy"]
    return val, json.loads((workdir / "metrics/eval.json").read_text())["test_accuracy"]


def test_the_small_data_recipe_learns_where_the_defaults_do_not(workdir, capsys):
    source = make_folder(workdir / "my-photos")
    default = run_pipeline(workdir, source)
    assert "validation split holds 9 images" in capsys.readouterr().err  # 2% of 450
    recipe = run_pipeline(workdir, source, **RECIPE)
    assert "validation split holds" not in capsys.readouterr().err  # 90 images, 30 per class
    with capsys.disabled():  # the figures docs/data.md quotes
        print(f"\nsmall data: defaults val/test {default}, recipe val/test {recipe}")
    assert recipe[1] >= 0.6 and recipe[1] >= default[1] + 0.15, (default, recipe)  # chance: 1/3
