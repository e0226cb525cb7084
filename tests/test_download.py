"""The download stage: every kind of source, through the real fetch and archive-reading code."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, add_bytes, image_folder_files, make_image_folder_archive, run_stage, write_params
from stages import download
from stages.errors import StageError


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, but answers 503 to the first `failures` requests (counted in `requests`)."""

    failures = 0
    requests: list[str] = []

    def do_GET(self):
        FlakyHandler.requests.append(self.path)
        if len(FlakyHandler.requests) <= FlakyHandler.failures:
            self.send_error(503, "try later")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """A file server on loopback; yields (base URL, served folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    FlakyHandler.failures, FlakyHandler.requests = 0, []
    handler = partial(FlakyHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()


def run_download(workdir: Path, **overrides) -> dict:
    write_params(workdir, **overrides)
    download.main()
    out = {p.stem: np.load(p) for p in (workdir / "data/raw").glob("*.npy")}
    out["meta"] = __import__("json").loads((workdir / "data/raw/meta.json").read_text())
    return out


def test_cifar_pickle_archive(workdir, pickle_archive):
    raw = run_download(workdir, **{"data.source": str(pickle_archive)})
    assert raw["train_images"].shape == (30 * 3, 3, 32, 32) and raw["train_images"].dtype == np.uint8
    assert raw["test_images"].shape == (6 * 3, 3, 32, 32)
    assert np.bincount(raw["train_labels"]).tolist() == [30, 30, 30]
    assert raw["meta"]["classes"] == CLASSES
    assert raw["meta"]["format"] == "cifar-pickle"
    assert raw["meta"]["sha256"] == hashlib.sha256(pickle_archive.read_bytes()).hexdigest()
    # Colour encodes the class in the tiny data: the labels must still point at the right images.
    for cls in range(3):
        assert raw["train_images"][raw["train_labels"] == cls][:, cls].mean() > 120


@pytest.mark.parametrize("kind", ["tar.gz", "zip", "folder"])
def test_image_folder_sources(workdir, tmp_path, kind):
    if kind == "folder":
        source = tmp_path / "folder"
        for name, data in image_folder_files().items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
    else:
        source = make_image_folder_archive(tmp_path / f"images.{kind}")
    raw = run_download(workdir, **{"data.source": str(source)})
    assert raw["meta"]["format"] == "image-folder"
    assert raw["meta"]["classes"] == CLASSES  # sorted folder names
    # 40-pixel JPEGs and grayscale PNGs all came out as 32×32 RGB.
    assert raw["train_images"].shape == (90, 3, 32, 32)
    assert raw["test_images"].shape == (18, 3, 32, 32)
    gray = raw["train_images"][4]  # file 0004.png of class 0 was saved as grayscale
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    for cls in range(3):
        assert raw["train_images"][raw["train_labels"] == cls][:, cls].mean() > 100


def test_image_size_resizes(workdir, folder_archive):
    raw = run_download(workdir, **{"data.source": str(folder_archive), "data.image_size": 16})
    assert raw["train_images"].shape[1:] == (3, 16, 16)


def test_file_url_and_matching_sha256(workdir, folder_archive):
    digest = hashlib.sha256(folder_archive.read_bytes()).hexdigest()
    raw = run_download(workdir, **{"data.source": folder_archive.as_uri(), "data.sha256": digest})
    assert raw["meta"]["sha256"] == digest


def test_relative_path_is_relative_to_the_repository_root(workdir, folder_archive, monkeypatch, tmp_path):
    """A queued experiment runs in .dvc/tmp/exps/<tmp>; DVC_ROOT names the user's repository."""
    repo = tmp_path / "repo"
    (repo / "datasets").mkdir(parents=True)
    (repo / "datasets" / "images.tar.gz").write_bytes(folder_archive.read_bytes())
    monkeypatch.setenv("DVC_ROOT", str(repo))
    raw = run_download(workdir, **{"data.source": "datasets/images.tar.gz"})
    assert raw["train_images"].shape == (90, 3, 32, 32)


def test_sha256_mismatch_is_refused(workdir, folder_archive):
    with pytest.raises(StageError, match="sha256 is .* but data.sha256 expects 0{64}"):
        run_download(workdir, **{"data.source": str(folder_archive), "data.sha256": "0" * 64})


def test_http_url(workdir, http_server, folder_archive):
    base, served = http_server
    (served / "images.tar.gz").write_bytes(folder_archive.read_bytes())
    raw = run_download(workdir, **{"data.source": f"{base}/images.tar.gz"})
    assert raw["train_images"].shape == (90, 3, 32, 32)
    assert len(list((workdir / "data/downloads").iterdir())) == 1


def test_transient_server_errors_are_retried(workdir, http_server, folder_archive, monkeypatch):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)  # the back-off, without waiting
    base, served = http_server
    (served / "images.tar.gz").write_bytes(folder_archive.read_bytes())
    FlakyHandler.failures = 2
    raw = run_download(workdir, **{"data.source": f"{base}/images.tar.gz"})
    assert raw["train_images"].shape == (90, 3, 32, 32)
    assert len(FlakyHandler.requests) > 2  # both 503s were retried (torchvision probes redirects too)


def test_a_missing_file_is_not_retried(workdir, http_server):
    base, _ = http_server
    with pytest.raises(StageError, match="could not download .*/nothing.tar.gz"):
        run_download(workdir, **{"data.source": f"{base}/nothing.tar.gz"})
    assert len(FlakyHandler.requests) == 1
    assert not any((workdir / "data/downloads").iterdir())


def test_official_cifar10_code_path(workdir, http_server, pickle_archive, monkeypatch):
    """`data.source: cifar10` with the official URL and checksums pointed at a local copy."""
    from torchvision.datasets import CIFAR10

    base, served = http_server
    data = pickle_archive.read_bytes()
    (served / "cifar-10-python.tar.gz").write_bytes(data)
    monkeypatch.setitem(download.OFFICIAL, "cifar10", {
        "url": f"{base}/cifar-10-python.tar.gz", "md5": hashlib.md5(data).hexdigest()})
    with tarfile.open(pickle_archive) as tar:
        md5 = {Path(m.name).name: hashlib.md5(tar.extractfile(m).read()).hexdigest()
               for m in tar if m.isfile()}
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})

    raw = run_download(workdir, **{"data.source": "cifar10"})
    assert raw["meta"]["md5"] == hashlib.md5(data).hexdigest()
    assert raw["train_images"].shape == (90, 3, 32, 32)

    # A batch that fails its published MD5 is refused before it is unpickled.
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", "0" * 32]])
    with pytest.raises(StageError, match="test_batch.*MD5"):
        run_download(workdir, **{"data.source": "cifar10"})


def test_offline_official_download_fails_with_one_line(workdir, monkeypatch):
    # Port 9 on loopback: nothing listens, so the connection is refused, as offline.
    monkeypatch.setitem(download.OFFICIAL, "cifar10", {
        "url": "http://127.0.0.1:9/cifar-10-python.tar.gz", "md5": "0" * 32})
    with pytest.raises(StageError, match="could not download .*set data.source to a local"):
        run_download(workdir, **{"data.source": "cifar10"})
    assert not (workdir / "data/downloads/cifar-10-python.tar.gz").exists()  # nothing partial left


def test_unreachable_source_exit_code_and_single_line(workdir):
    write_params(workdir, **{"data.source": "http://127.0.0.1:9/data.tar.gz"})
    result = run_stage("download", workdir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error (download): could not download"), result.stderr
    assert "Traceback" not in result.stderr


def test_output_bytes_are_reproducible(workdir, folder_archive):
    run_download(workdir, **{"data.source": str(folder_archive)})
    first = {p.name: p.read_bytes() for p in (workdir / "data/raw").iterdir()}
    run_download(workdir, **{"data.source": str(folder_archive)})
    second = {p.name: p.read_bytes() for p in (workdir / "data/raw").iterdir()}
    assert first == second


def test_malicious_pickle_is_refused(workdir, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps({b"data": Evil()}))
        add_bytes(tar, "cifar-10-batches-py/test_batch", b"")
    with pytest.raises(StageError, match="refusing to load global builtins.print"):
        run_download(workdir, **{"data.source": str(archive)})


def test_member_escaping_the_folder_is_refused(workdir, tmp_path):
    archive = tmp_path / "escape.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "../train/cat/0.png", b"x")
    with pytest.raises(StageError, match="'../train/cat/0.png' would land outside"):
        run_download(workdir, **{"data.source": str(archive)})


def test_unreadable_image_is_named(workdir, tmp_path):
    archive = tmp_path / "bad.zip"
    make_image_folder_archive(archive, prefix="")
    import zipfile
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("train/cat/broken.png", b"not an image")
    with pytest.raises(StageError, match="cannot read image 'train/cat/broken.png'"):
        run_download(workdir, **{"data.source": str(archive)})


def test_missing_split_is_named(workdir, tmp_path):
    archive = tmp_path / "train-only.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in image_folder_files().items():
            if name.startswith("train/"):
                add_bytes(tar, name, data)
    with pytest.raises(StageError, match="no test/<class>/<image> files found"):
        run_download(workdir, **{"data.source": str(archive)})


def test_truncated_archive_is_named(workdir, tmp_path, folder_archive):
    archive = tmp_path / "truncated.tar.gz"
    archive.write_bytes(folder_archive.read_bytes()[: folder_archive.stat().st_size // 2])
    with pytest.raises(StageError, match="truncated.tar.gz: truncated or corrupt archive"):
        run_download(workdir, **{"data.source": str(archive)})


@pytest.mark.parametrize("kind", ["folder", "tar.gz"])
def test_empty_class_is_named(workdir, tmp_path, kind):
    source = tmp_path / "images"
    for name, data in image_folder_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    (source / "train" / "zebra").mkdir()
    (source / "test" / "zebra").mkdir()
    if kind == "tar.gz":
        with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tar:
            tar.add(source, arcname="images")
        source = tmp_path / "images.tar.gz"
    with pytest.raises(StageError, match="class folder (train|test)/zebra/ holds no images"):
        run_download(workdir, **{"data.source": str(source)})
