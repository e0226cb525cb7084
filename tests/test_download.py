"""The download stage: every kind of source, through the real fetch and archive-reading code."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CLASSES,
    REPO,
    add_bytes,
    class_images,
    image_folder_files,
    make_image_folder_archive,
    run_stage,
    write_params,
)

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
    assert (
        raw["train_images"].shape == (30 * 3, 3, 32, 32) and raw["train_images"].dtype == np.uint8
    )
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
    raw = run_download(
        workdir,
        **{"data.source": str(folder_archive), "data.image_size": 16, "model.input_size": 32},
    )  # net sees 32 pixels: data.image_size alone would be refused for net
    assert raw["train_images"].shape[1:] == (3, 16, 16)


def test_file_url_and_matching_sha256(workdir, folder_archive):
    digest = hashlib.sha256(folder_archive.read_bytes()).hexdigest()
    raw = run_download(workdir, **{"data.source": folder_archive.as_uri(), "data.sha256": digest})
    assert raw["meta"]["sha256"] == digest


def test_relative_path_is_relative_to_the_repository_root(
    workdir, folder_archive, monkeypatch, tmp_path
):
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
    assert (
        len(FlakyHandler.requests) > 2
    )  # both 503s were retried (torchvision probes redirects too)


def test_a_missing_file_is_not_retried(workdir, http_server):
    base, _ = http_server
    with pytest.raises(StageError, match="could not download .*/nothing.tar.gz"):
        run_download(workdir, **{"data.source": f"{base}/nothing.tar.gz"})
    assert len(FlakyHandler.requests) == 1
    assert not any((workdir / "data/downloads").iterdir())


def point_official_at(monkeypatch, source: str, url: str, archive: bytes, md5: str | None = None):
    """Aim `data.source: cifar10|cifar100` at a local URL: the archive's MD5 (or `md5`) and its
    batches' MD5s stand in for the published ones, in torchvision's own lists."""
    from torchvision.datasets import CIFAR10, CIFAR100

    md5 = md5 or hashlib.md5(archive).hexdigest()
    monkeypatch.setitem(download.OFFICIAL, source, {"url": url, "md5": md5})
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        md5s = {
            Path(m.name).name: hashlib.md5(tar.extractfile(m).read()).hexdigest()
            for m in tar
            if m.isfile()
        }
    cls = CIFAR10 if source == "cifar10" else CIFAR100
    monkeypatch.setattr(cls, "train_list", [[name, md5s[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5s[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})
    return cls


def test_official_cifar10_code_path(workdir, http_server, pickle_archive, monkeypatch):
    """`data.source: cifar10` with the official URL and checksums pointed at a local copy."""
    base, served = http_server
    data = pickle_archive.read_bytes()
    (served / "cifar-10-python.tar.gz").write_bytes(data)
    cls = point_official_at(monkeypatch, "cifar10", f"{base}/cifar-10-python.tar.gz", data)

    raw = run_download(workdir, **{"data.source": "cifar10", "data.sha256": None})
    assert raw["meta"]["md5"] == hashlib.md5(data).hexdigest()
    assert raw["train_images"].shape == (90, 3, 32, 32)

    # A batch that fails its published MD5 is refused before it is unpickled.
    monkeypatch.setattr(cls, "test_list", [["test_batch", "0" * 32]])
    with pytest.raises(StageError, match="test_batch.*MD5"):
        run_download(workdir, **{"data.source": "cifar10"})


def test_offline_official_download_fails_with_one_line(workdir, monkeypatch):
    # Port 9 on loopback: nothing listens, so the connection is refused, as offline.
    monkeypatch.setitem(
        download.OFFICIAL,
        "cifar10",
        {"url": "http://127.0.0.1:9/cifar-10-python.tar.gz", "md5": "0" * 32},
    )
    with pytest.raises(
        StageError, match="could not download .*Without internet, use the bundled CIFAR-10"
    ):
        run_download(workdir, **{"data.source": "cifar10"})
    assert not (workdir / "data/downloads/cifar-10-python.tar.gz").exists()  # nothing partial left


def test_unreachable_source_exit_code_and_single_line(workdir):
    write_params(workdir, **{"data.source": "http://127.0.0.1:9/data.tar.gz"})
    result = run_stage("download", workdir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error (download): could not download"), (
        result.stderr
    )
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


# --- broken transfers: nothing partial stays, short transfers are retried ----------------------


@pytest.fixture
def broken_server():
    """serve(body, short=N, stall=False, name=...) -> (URL, request log): a loopback server whose
    first N answers declare the whole body's Content-Length but send half of it and close; with
    stall, every answer sends half and then hangs until the test is over."""
    servers, release = [], threading.Event()

    def serve(
        body: bytes, short: int = 0, stall: bool = False, name: str = "data.tar.gz"
    ) -> tuple[str, list[str]]:
        requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if stall or len(requests) <= short:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if stall:
                        release.wait(60)
                    return  # HTTP/1.0: returning closes the connection, half-way through the body
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}", requests

    yield serve
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def downloads(workdir: Path) -> list[str]:
    folder = workdir / "data/downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_short_transfers_fail_after_retries_and_leave_nothing(
    workdir, broken_server, folder_archive
):
    url, requests = broken_server(folder_archive.read_bytes(), short=99)
    write_params(workdir, **{"data.source": url})
    result = run_stage("download", workdir)  # real back-off: 1 s + 2 s
    assert result.returncode == 1
    assert "retrying in 1 s" in result.stdout and "retrying in 2 s" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error (download): could not download {url} (the server sent "
    ), result.stderr
    assert len(requests) == download.RETRIES
    assert downloads(workdir) == []  # no `.part`, no file that looks complete
    assert not (workdir / "data/raw").exists()


def test_a_short_transfer_is_retried(workdir, broken_server, folder_archive, monkeypatch, capsys):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    url, requests = broken_server(folder_archive.read_bytes(), short=1)
    raw = run_download(workdir, **{"data.source": url})
    assert len(requests) == 2 and "retrying in 1 s" in capsys.readouterr().out
    assert [(workdir / "data/downloads" / name).read_bytes() for name in downloads(workdir)] == [
        folder_archive.read_bytes()
    ]
    local = run_download(workdir, **{"data.source": str(folder_archive)})
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(raw[key], local[key]), key


def test_official_archive_failing_its_md5_is_retried_then_one_line(
    workdir, http_server, pickle_archive, monkeypatch, capsys
):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    base, served = http_server
    (served / "cifar-10-python.tar.gz").write_bytes(pickle_archive.read_bytes())
    url = f"{base}/cifar-10-python.tar.gz"
    point_official_at(monkeypatch, "cifar10", url, pickle_archive.read_bytes(), md5="0" * 32)
    with pytest.raises(StageError) as error:
        run_download(workdir, **{"data.source": "cifar10"})
    message = str(error.value)
    assert message.startswith(f"{url}: the download does not match its published MD5 {'0' * 32}")
    assert "\n" not in message
    assert capsys.readouterr().out.count("retrying in") == download.RETRIES - 1
    assert downloads(workdir) == []


def test_official_short_transfer_is_retried(workdir, broken_server, pickle_archive, monkeypatch):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    data = pickle_archive.read_bytes()
    # Two short answers: whether or not torchvision probes for redirects first, the first download
    # is cut short and a later one is complete.
    url, _ = broken_server(data, short=2, name="cifar-10-python.tar.gz")
    point_official_at(monkeypatch, "cifar10", url, data)
    raw = run_download(workdir, **{"data.source": "cifar10"})
    assert raw["train_images"].shape == (90, 3, 32, 32)
    assert downloads(workdir) == ["cifar-10-python.tar.gz"]
    assert (workdir / "data/downloads/cifar-10-python.tar.gz").read_bytes() == data


def test_a_corrupt_cached_official_archive_is_downloaded_again(
    workdir, http_server, pickle_archive, monkeypatch, capsys
):
    base, served = http_server
    data = pickle_archive.read_bytes()
    (served / "cifar-10-python.tar.gz").write_bytes(data)
    point_official_at(monkeypatch, "cifar10", f"{base}/cifar-10-python.tar.gz", data)
    cached = workdir / "data/downloads/cifar-10-python.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])  # e.g. copied in by hand, half-way
    raw = run_download(workdir, **{"data.source": "cifar10"})
    assert "fails its MD5" in capsys.readouterr().out
    assert cached.read_bytes() == data and raw["train_images"].shape == (90, 3, 32, 32)


def test_ctrl_c_mid_download_leaves_no_partial_file(workdir, broken_server):
    url, _ = broken_server(os.urandom(1 << 20), stall=True)  # half of it, then nothing
    write_params(workdir, **{"data.source": url})
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.download"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not any(p.stat().st_size for p in (workdir / "data/downloads").glob("*.part")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no .part file appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["error (download): interrupted; run again"]
    assert downloads(workdir) == []


# --- archives that try to reach outside the data, or are damaged --------------------------------


def _zip(path: Path, extra) -> Path:
    make_image_folder_archive(path, prefix="tiny/")
    with zipfile.ZipFile(path, "a") as zf:
        extra(zf)
    return path


def _tar(path: Path, extra) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in image_folder_files().items():
            add_bytes(tar, "tiny/" + name, data)
        extra(tar)
    return path


def _zip_symlink(zf: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo("tiny/train/cat/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16  # what `zip -y` stores for a symlink
    zf.writestr(info, "/etc/passwd")


def _tar_symlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("tiny/train/cat/link.png")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


UNSAFE = {
    "zip-dotdot": (
        "bad.zip",
        _zip,
        lambda zf: zf.writestr("tiny/../../outside.png", b"x"),
        "member 'tiny/../../outside.png' would land outside the extraction folder",
    ),
    "zip-absolute": (
        "bad.zip",
        _zip,
        lambda zf: zf.writestr("/abs/train/cat/0.png", b"x"),
        "member '/abs/train/cat/0.png' would land outside the extraction folder",
    ),
    "zip-symlink": ("bad.zip", _zip, _zip_symlink, "member 'tiny/train/cat/link.png' is a link"),
    "tar-absolute": (
        "bad.tar.gz",
        _tar,
        lambda tar: add_bytes(tar, "/abs/train/cat/0.png", b"x"),
        "member '/abs/train/cat/0.png' would land outside the extraction folder",
    ),
    "tar-symlink": ("bad.tar.gz", _tar, _tar_symlink, "member 'tiny/train/cat/link.png' is a link"),
}


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_archive_member_is_refused(workdir, tmp_path, case):
    name, build, extra, message = UNSAFE[case]
    archive = build(tmp_path / name, extra)
    with pytest.raises(StageError) as error:
        run_download(workdir, **{"data.source": str(archive)})
    assert str(error.value).startswith(f"{archive}: {message}")
    assert not (workdir / "data/raw").exists()


def test_unsafe_member_exit_code_and_single_line(workdir, tmp_path):
    archive = _zip(tmp_path / "bad.zip", _zip_symlink)
    write_params(workdir, **{"data.source": str(archive)})
    result = run_stage("download", workdir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error (download): {archive}: member 'tiny/train/cat/link.png' is a link; "
        "links are refused (they can point outside the data)"
    ]
    assert not (workdir / "data/raw").exists()


def write_folder(folder: Path) -> Path:
    for name, data in image_folder_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("target", ["file", "folder"])
def test_symlink_in_a_folder_source_is_refused(workdir, tmp_path, target):
    folder = write_folder(tmp_path / "images")
    outside = tmp_path / "outside"
    (outside / "0000.png").parent.mkdir(parents=True)
    (outside / "0000.png").write_bytes((folder / "train/cat/0000.png").read_bytes())
    link = folder / "train/cat/zzz.png" if target == "file" else folder / "train/cat/zzz"
    link.symlink_to(outside / "0000.png" if target == "file" else outside)
    with pytest.raises(
        StageError, match=re.escape(f"{folder}: 'train/cat/{link.name}' is a symbolic link")
    ):
        run_download(workdir, **{"data.source": str(folder)})
    assert not (workdir / "data/raw").exists()


def test_a_folder_reached_through_a_link_is_read(workdir, tmp_path):
    (tmp_path / "alias").symlink_to(write_folder(tmp_path / "images"))
    raw = run_download(workdir, **{"data.source": str(tmp_path / "alias")})
    assert raw["train_images"].shape == (90, 3, 32, 32)


@pytest.mark.parametrize(
    "name, cut",
    [
        ("half.zip", "half"),
        ("download", "half"),  # zip magic, no suffix
        ("head.tar.gz", 10),
    ],
)  # gzip cut inside its first block
def test_truncated_zip_or_gzip_is_named(workdir, tmp_path, name, cut):
    built = make_image_folder_archive(
        tmp_path / ("x.tar.gz" if name.endswith(".tar.gz") else "x.zip")
    )
    data = built.read_bytes()
    archive = tmp_path / name
    archive.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    with pytest.raises(StageError, match=re.escape(f"{archive}: truncated or corrupt archive")):
        run_download(workdir, **{"data.source": str(archive)})
    assert not (workdir / "data/raw").exists()


def test_a_class_missing_in_test_is_named(workdir, tmp_path):
    archive = tmp_path / "no-test-dog.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in image_folder_files().items():
            if not name.startswith("test/dog/"):
                add_bytes(tar, name, data)
    with pytest.raises(
        StageError,
        match=re.escape(
            f"{archive}: train/ and test/ differ in classes (missing in test/: ['dog']"
        ),
    ):
        run_download(workdir, **{"data.source": str(archive)})
    assert not (workdir / "data/raw").exists()


# --- checksums: pickles only when vouched for; folders have a tree hash -------------------------


def test_pickle_archive_without_sha256_is_not_unpickled(workdir, pickle_archive, monkeypatch):
    unpickled = []
    real = download._unpickle
    monkeypatch.setattr(
        download,
        "_unpickle",
        lambda archive, name, data: unpickled.append(name) or real(archive, name, data),
    )
    digest = hashlib.sha256(pickle_archive.read_bytes()).hexdigest()
    with pytest.raises(StageError) as error:
        run_download(workdir, **{"data.source": str(pickle_archive), "data.sha256": None})
    assert str(error.value) == (
        f"{pickle_archive} holds pickled CIFAR batches, and unpickling can run "
        f"code: set data.sha256 to vouch for this archive (its sha256 is {digest})"
    )
    assert unpickled == [] and not (workdir / "data/raw").exists()

    raw = run_download(workdir, **{"data.source": str(pickle_archive), "data.sha256": digest})
    assert "test_batch" in unpickled and raw["meta"]["format"] == "cifar-pickle"


def test_folder_tree_hash(workdir, tmp_path):
    files = image_folder_files()
    first, second = write_folder(tmp_path / "first"), write_folder(tmp_path / "second")
    tree = download.tree_sha256(first)
    assert tree == download.tree_sha256(second)  # same files, other place, other timestamps
    lines = "".join(
        f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n" for name in sorted(files)
    )
    assert tree == hashlib.sha256(lines.encode()).hexdigest()  # the definition in the docstring

    raw = run_download(workdir, **{"data.source": str(first), "data.sha256": tree})
    assert raw["meta"]["sha256"] == tree

    image = second / "train/dog/0001.png"
    image.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))
    assert download.tree_sha256(second) != tree
    shutil.rmtree(workdir / "data/raw")  # so that the next assert sees whether it was written again
    expected = re.escape(f"{second}: sha256 is ") + f".*, but data.sha256 expects {tree}"
    with pytest.raises(StageError, match=expected):
        run_download(workdir, **{"data.source": str(second), "data.sha256": tree})
    assert not (workdir / "data/raw").exists()


# --- CIFAR-100 --------------------------------------------------------------------------------------

FINE = ["apple", "bee", "castle", "dolphin"]


def make_cifar100_archive(path: Path, train_per_class: int = 5, test_per_class: int = 2) -> Path:
    """A .tar.gz in the official CIFAR-100 python layout: train, test and meta pickles."""

    def batch(per_class: int, seed: int) -> dict:
        images = np.concatenate([class_images(per_class, c, seed) for c in range(len(FINE))])
        labels = np.repeat(np.arange(len(FINE)), per_class)
        return {
            b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 2).tolist(),
        }

    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, "cifar-100-python/train", pickle.dumps(batch(train_per_class, seed=1)))
        add_bytes(tar, "cifar-100-python/test", pickle.dumps(batch(test_per_class, seed=2)))
        add_bytes(
            tar,
            "cifar-100-python/meta",
            pickle.dumps(
                {
                    b"fine_label_names": [c.encode() for c in FINE],
                    b"coarse_label_names": [b"a", b"b"],
                }
            ),
        )
    return path


def check_cifar100(raw: dict) -> None:
    assert raw["meta"]["format"] == "cifar-pickle" and raw["meta"]["classes"] == FINE
    assert raw["train_images"].shape == (20, 3, 32, 32) and raw["test_images"].shape == (
        8,
        3,
        32,
        32,
    )
    assert np.bincount(raw["train_labels"]).tolist() == [5, 5, 5, 5]  # fine labels, not coarse
    for cls in range(3):  # the colour encodes the class: labels still point at their images
        assert raw["train_images"][raw["train_labels"] == cls][:, cls].mean() > 120


def test_local_cifar100_archive(workdir, tmp_path):
    archive = make_cifar100_archive(tmp_path / "tiny-cifar100.tar.gz")
    check_cifar100(
        run_download(workdir, **{"data.source": str(archive)})
    )  # sha256 pinned by write_params


def test_official_cifar100_code_path(workdir, http_server, tmp_path, monkeypatch):
    data = make_cifar100_archive(tmp_path / "tiny-cifar100.tar.gz").read_bytes()
    base, served = http_server
    (served / "cifar-100-python.tar.gz").write_bytes(data)
    cls = point_official_at(monkeypatch, "cifar100", f"{base}/cifar-100-python.tar.gz", data)
    raw = run_download(workdir, **{"data.source": "cifar100"})
    check_cifar100(raw)
    assert raw["meta"]["md5"] == hashlib.md5(data).hexdigest()
    assert downloads(workdir) == ["cifar-100-python.tar.gz"]

    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": "0" * 32})
    with pytest.raises(StageError, match="batch 'meta' is missing or fails its MD5 check"):
        run_download(workdir, **{"data.source": "cifar100"})


def test_files_that_are_not_images_by_name_are_skipped_and_counted(workdir, tmp_path, capsys):
    """A user's folder as it comes: notes, a README, macOS litter beside the images."""
    source = tmp_path / "photos"
    for name, data in image_folder_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    litter = {
        "train/cat/notes.txt": b"shot on a rainy day",
        "train/cat/.DS_Store": b"\0\0\0\1Bud1",
        "test/dog/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "README.md": b"# my photos",
    }
    for name, data in litter.items():
        (source / name).write_bytes(data)
    raw = run_download(workdir, **{"data.source": str(source)})
    out = capsys.readouterr().out
    assert "skipped 4 file(s) that are not images by their name" in out
    assert "README.md" in out and "test/dog/Thumbs.db" in out
    expected = sum(1 for n in image_folder_files() if n.startswith("train/"))
    assert len(raw["train_labels"]) == expected


def test_an_image_that_cannot_be_decoded_is_still_an_error_naming_it(workdir, tmp_path):
    source = tmp_path / "photos"
    for name, data in image_folder_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    (source / "train/cat/IMG_0001.JPG").write_bytes(b"half a jpeg")
    with pytest.raises(StageError, match="cannot read image 'train/cat/IMG_0001.JPG'"):
        run_download(workdir, **{"data.source": str(source)})
