"""Tiny data sets in both real formats, built by the tests, and a scratch working folder.

The stages run from a folder holding params.yaml (DVC runs them from the repository root), so
`workdir` makes such a folder, with the repository's own params.yaml pointed at tiny data.

"The repository's params.yaml" is the committed one (git's index), never the workspace's: the
README's tour leaves `dvc exp run -S` values in the workspace file, and a test suite whose result
depended on the user's last experiment would say nothing about the code.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stages import augment, download
from stages.io import sha256_of
from stages.runtime import CoreShare

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "ship"]

# The tests log to stores of their own, never to the server of the shell that runs them.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session", autouse=True)
def the_suite_shares_the_cores():
    """Each of the test suite's processes (one, or one per pytest-xdist worker) counts as one
    process computing on this machine while it runs (runtime.CoreShare): a training beside
    `make test` takes its share of the cores instead of spinning against the tests' own work
    (docs/speed.md, "A shared machine")."""
    with CoreShare():
        yield


@pytest.fixture(autouse=True)
def no_tracking_uri_leaks():
    """mlflow.set_tracking_uri() also sets $MLFLOW_TRACKING_URI "so that subprocesses inherit
    it": after a test that logs in-process, every later test's stages and `dvc exp run`s would
    log to that test's store (and read their runs back from their own, finding none)."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def class_images(n: int, cls: int, seed: int, size: int = 32) -> np.ndarray:
    """n HWC uint8 images whose colour depends on the class, so a model can learn something."""
    rng = np.random.default_rng(seed * 100 + cls)
    base = np.zeros((n, size, size, 3), dtype=np.int16)
    base[..., cls % 3] = 150
    noise = rng.integers(-60, 60, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def png_bytes(
    array: np.ndarray, mode: str = "RGB", size: int | None = None, fmt: str = "PNG"
) -> bytes:
    img = Image.fromarray(array).convert(mode)
    if size:
        img = img.resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_cifar_pickle_archive(
    path: Path, train_per_class: int = 30, test_per_class: int = 6
) -> Path:
    """A .tar.gz in the official CIFAR-10 python layout: five data batches, a test batch, meta."""

    def batch(per_class: int, seed: int) -> dict:
        images = np.concatenate([class_images(per_class, c, seed) for c in range(len(CLASSES))])
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        order = np.random.default_rng(seed).permutation(len(labels))  # interleaved, like CIFAR
        data = images[order].transpose(0, 3, 1, 2).reshape(len(labels), -1)
        return {b"data": data, b"labels": labels[order].tolist(), b"batch_label": b"tiny"}

    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            add_bytes(
                tar,
                f"cifar-10-batches-py/data_batch_{i}",
                pickle.dumps(batch(max(1, train_per_class // 5), seed=i)),
            )
        add_bytes(
            tar, "cifar-10-batches-py/test_batch", pickle.dumps(batch(test_per_class, seed=9))
        )
        add_bytes(
            tar,
            "cifar-10-batches-py/batches.meta",
            pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}),
        )
    return path


def image_folder_files(train_per_class: int = 30, test_per_class: int = 6) -> dict[str, bytes]:
    """{'train/cat/0000.png': bytes, ...}: PNG and JPEG, RGB and grayscale, 32 and 40 pixels."""
    files = {}
    for split, n, seed in [("train", train_per_class, 1), ("test", test_per_class, 2)]:
        for c, cls in enumerate(CLASSES):
            for i, img in enumerate(class_images(n, c, seed)):
                if i % 5 == 3:
                    files[f"{split}/{cls}/{i:04d}.jpg"] = png_bytes(img, size=40, fmt="JPEG")
                elif i % 5 == 4:
                    files[f"{split}/{cls}/{i:04d}.png"] = png_bytes(img, mode="L")
                else:
                    files[f"{split}/{cls}/{i:04d}.png"] = png_bytes(img)
    return files


def make_image_folder_archive(path: Path, prefix: str = "tiny/", **sizes) -> Path:
    files = image_folder_files(**sizes)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(prefix + name, data)
    else:
        with tarfile.open(path, "w:gz") as tar:
            for name, data in files.items():
                add_bytes(tar, prefix + name, data)
    return path


@pytest.fixture(scope="session")
def pickle_archive(tmp_path_factory) -> Path:
    return make_cifar_pickle_archive(tmp_path_factory.mktemp("data") / "tiny-cifar.tar.gz")


@pytest.fixture(scope="session")
def folder_archive(tmp_path_factory) -> Path:
    return make_image_folder_archive(tmp_path_factory.mktemp("data") / "tiny-folder.tar.gz")


def write_params(folder: Path, **overrides) -> dict:
    """The repository's params.yaml with dotted overrides, e.g. {"train.epochs": 2}.

    A data.source other than the default gets data.sha256 to match, unless the overrides set
    data.sha256 themselves: a local file's hash (the download stage unpickles a CIFAR pickle
    archive only when data.sha256 vouches for it), else None (no checksum), as a user would set it.
    """
    source = overrides.get("data.source")
    if isinstance(source, str) and "data.sha256" not in overrides:
        path = (
            Path(source) if Path(source).is_absolute() else folder / source
        )  # as the stage sees it
        overrides = {**overrides, "data.sha256": sha256_of(path) if path.is_file() else None}
    params = repository_params(**overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def committed_params_text() -> str:
    """params.yaml as committed (or staged with `git add`), whatever the workspace holds; the
    file itself outside a git checkout."""
    shown = subprocess.run(
        ["git", "show", ":params.yaml"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


def repository_params(**overrides) -> dict:
    """The repository's committed params.yaml as a dict, with dotted overrides."""
    params = yaml.safe_load(committed_params_text())
    for key, value in overrides.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return params


# One thread: a test that compares the bytes of two runs must not depend on what else computes on
# this machine meanwhile (train.threads: 0 follows it: tests/test_sharing.py), and batches of a
# few tiny images gain nothing from more.
TINY = {"train.epochs": 2, "train.lr": 0.01, "data.val_fraction": 0.2, "train.threads": 1}


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: creating its schema takes seconds, and a copy of
    it is what a stage's first run would have made."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def workdir(tmp_path, monkeypatch, pickle_archive, request) -> Path:
    """A scratch folder with params.yaml on tiny data; the stages' relative paths land here.
    Its MLflow store (mlflow.db) is there already, empty, unless the test is marked
    `fresh_store`: one that sees the stages make the store, or not make it."""
    monkeypatch.chdir(tmp_path)
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    write_params(tmp_path, **{"data.source": str(pickle_archive), **TINY})
    if request.node.get_closest_marker("fresh_store") is None:
        shutil.copy(request.getfixturevalue("empty_store"), tmp_path / "mlflow.db")
    return tmp_path


def run_stage(name: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m stages.<name>` in a subprocess, as DVC runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def copy_repo(dest: Path) -> Path:
    """The files git tracks, as a clone would have them (with the working tree's edits, but the
    committed params.yaml): a file the pipeline needs but git doesn't track fails the tests here
    as it would fail a user."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(committed_params_text())
    return dest


def start_train(cwd, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(cwd, epochs: int, proc: subprocess.Popen, timeout=120):
    """Block until the training in `proc` has checkpointed at least `epochs` epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in (cwd / "data/checkpoints").glob("*.pt"):
            try:
                if len(torch.load(path, weights_only=True)["history"]) >= epochs:
                    return path
            except (EOFError, RuntimeError, FileNotFoundError):
                pass  # replaced while we read it
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError("no checkpoint")


def finish(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


EPOCHS = 60  # tiny epochs: long enough in all to be interrupted part-way


@pytest.fixture
def prepared(workdir, pickle_archive):
    write_params(workdir, **{**TINY, "data.source": str(pickle_archive), "train.epochs": EPOCHS})
    download.main()
    augment.main()
    return workdir
