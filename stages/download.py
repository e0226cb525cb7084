"""Stage `download`: a data source → byte-stable uint8 arrays in data/raw/.

Reads params: data.source, data.sha256, data.image_size.

A source is one of
  cifar10, cifar100        the official archives, fetched with torchvision's download utilities
                           and checked against their published MD5;
  a path, file:// or http(s):// URL to
    a .tar.gz in the CIFAR python-pickle layout (data_batch_1…5 + test_batch, or train + test), or
    an image-folder archive (.tar.gz, .tar, .zip) or folder: train/<class>/*, test/<class>/*,
    any image Pillow reads, any size, RGB or grayscale.

Archives are read in place, member by member: nothing is extracted to disk, so no member can land
outside a folder. CIFAR pickles are unpickled with an allow-list that admits numpy arrays only,
and for the official archives only after their checksum was verified (unpickling runs code).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import tarfile
import time
import urllib.error
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages import errors, io as sio, params as P
from stages.errors import StageError

OUT = Path("data/raw")
DOWNLOADS = Path("data/downloads")  # fetched archives; kept across runs, not a DVC output

OFFICIAL = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}
SPLITS = ("train", "test")


def main() -> None:
    params = P.load()
    data = params.data

    path, official_md5 = fetch(data.source)
    sha256 = sio.sha256_of(path) if path.is_file() else None
    if data.sha256 and path.is_file() and sha256 != data.sha256.lower():
        raise StageError(
            f"{path}: sha256 is {sha256}, but data.sha256 expects {data.sha256.lower()}"
        )
    if data.sha256 and path.is_dir():
        raise StageError(f"data.sha256 is set, but {path} is a folder: a checksum needs an archive")

    if path.is_file() and _is_tar(path) and _cifar_pickle_layout(path):
        fmt = "cifar-pickle"
        arrays, classes = read_cifar_pickle(path, data.image_size, official_md5 is not None)
    else:
        fmt = "image-folder"
        arrays, classes = read_image_folder(path, data.image_size)

    for split in SPLITS:
        sio.save_array(OUT / f"{split}_images.npy", arrays[f"{split}_images"])
        sio.save_array(OUT / f"{split}_labels.npy", arrays[f"{split}_labels"])
    sio.write_json(OUT / "meta.json", {
        "source": data.source,
        "format": fmt,
        "sha256": sha256,  # always recorded, so a user can pin data.sha256 afterwards
        "md5": official_md5,
        "classes": classes,
        "image_size": data.image_size,
        "train_count": int(len(arrays["train_labels"])),
        "test_count": int(len(arrays["test_labels"])),
    })
    print(f"download: {len(arrays['train_labels'])} train + {len(arrays['test_labels'])} test "
          f"images, {len(classes)} classes, {fmt}, sha256 {sha256}")


# --- where the bytes come from ------------------------------------------------------------------

def fetch(source: str) -> tuple[Path, str | None]:
    """Return a local file or folder for the source, and the MD5 it was verified against."""
    from torchvision.datasets.utils import check_integrity

    if source in OFFICIAL:
        url, md5 = OFFICIAL[source]["url"], OFFICIAL[source]["md5"]
        name = Path(urlparse(url).path).name
        _download(url, name, md5)
        path = DOWNLOADS / name
        if not check_integrity(str(path), md5):
            path.unlink(missing_ok=True)
            raise StageError(f"{url}: MD5 of the download does not match {md5}; removed it, run again")
        return path, md5

    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        name = Path(urlparse(source).path).name or "download"
        # Named by the URL's hash too, so two sources with the same file name never collide.
        name = f"{hashlib.sha1(source.encode()).hexdigest()[:10]}-{name}"
        _download(source, name, None)
        return DOWNLOADS / name, None
    if scheme == "file":
        path = Path(urlparse(source).path)
    elif scheme == "":
        # Relative to the repository root: a queued `dvc exp run` works in a temporary copy under
        # .dvc/tmp/exps, where DVC_ROOT still names the repository the user typed the path in.
        path = Path(os.environ.get("DVC_ROOT", ".")) / Path(source).expanduser()
    else:
        raise StageError(f"data.source = {source!r}: unknown scheme '{scheme}' "
                         "(allowed: cifar10, cifar100, a path, file://, http://, https://)")
    if not path.exists():
        raise StageError(f"data.source = {source!r}: {path} does not exist")
    return path, None


RETRIES = 3  # attempts for a transient failure (timeout, reset, HTTP 429/5xx), backing off 1, 2, 4 s


def _download(url: str, name: str, md5: str | None) -> None:
    from torchvision.datasets.utils import download_url

    target = DOWNLOADS / name
    if target.exists() and md5 is None:
        return  # a user URL fetched before; data.sha256 guards its content
    for attempt in range(1, RETRIES + 1):
        try:
            download_url(url, str(DOWNLOADS), filename=name, md5=md5)
            return
        except (urllib.error.URLError, OSError) as exc:
            target.unlink(missing_ok=True)  # never leave a partial download behind
            if attempt < RETRIES and _transient(exc):
                print(f"download: {url} failed ({exc}); retrying in {2 ** (attempt - 1)} s", flush=True)
                time.sleep(2 ** (attempt - 1))
                continue
            reason = getattr(exc, "reason", exc)
            raise StageError(
                f"could not download {url} ({reason}). Without internet, set data.source to a local "
                "archive or folder, e.g. dvc exp run -S data.source=/path/to/cifar10-jpg.tar.gz "
                "(README: 'Offline use')"
            ) from None


def _transient(exc: Exception) -> bool:
    """Worth another try: a server error or a broken transfer. Not: no network, no such file."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, (TimeoutError, ConnectionResetError, http.client.IncompleteRead,
                               urllib.error.ContentTooShortError))


# --- archives, read member by member --------------------------------------------------------------

def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def iter_members(path: Path) -> Iterator[tuple[str, bytes | None]]:
    """Yield (member name, bytes) for every regular file of a tar, zip or folder, and
    (name ending in '/', None) for every folder, so that empty class folders can be named."""
    if path.is_dir():
        for entry in sorted(path.rglob("*")):
            name = entry.relative_to(path).as_posix()
            if entry.is_dir():
                yield name + "/", None
            elif entry.is_file():
                yield name, entry.read_bytes()
    elif _is_tar(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    _check_member_name(path, member.name)
                    if member.issym() or member.islnk():
                        raise StageError(f"{path}: member '{member.name}' is a link; "
                                         "links are refused (they can point outside the data)")
                    if member.isdir():
                        yield member.name.rstrip("/") + "/", None
                    elif member.isfile():
                        yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise StageError(f"{path}: truncated or corrupt archive ({exc})") from None
    elif zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    _check_member_name(path, info.filename)
                    yield (info.filename, None) if info.is_dir() else (info.filename, zf.read(info))
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise StageError(f"{path}: truncated or corrupt archive ({exc})") from None
    else:
        raise StageError(f"{path}: not a folder, a tar archive or a zip archive")


def _check_member_name(archive: Path, name: str) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("\\") or ":" in pure.parts[0]:
        raise StageError(f"{archive}: member '{name}' would land outside the extraction folder")


# --- the CIFAR python-pickle layout -------------------------------------------------------------

CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                 "meta": "batches.meta"}
CIFAR100_FILES = {"train": ["train"], "test": ["test"], "meta": "meta"}


def _cifar_pickle_layout(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {PurePosixPath(n).name for n in tar.getnames()}
    except (tarfile.TarError, EOFError, OSError):
        return False  # reading it as an image folder reports the damage, naming the archive
    return {"data_batch_1", "test_batch"} <= names or {"train", "test", "meta"} <= names


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code runs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(archive: Path, name: str, data: bytes) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad batch file
        raise StageError(f"{archive}: cannot read CIFAR batch '{name}' ({exc})") from None
    if not isinstance(obj, dict):
        raise StageError(f"{archive}: CIFAR batch '{name}' is not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_pickle(path: Path, image_size: int, official: bool):
    members = {PurePosixPath(n).name: (n, b) for n, b in iter_members(path) if b is not None}
    files = CIFAR10_FILES if "data_batch_1" in members else CIFAR100_FILES
    label_key = "labels" if files is CIFAR10_FILES else "fine_labels"
    names_key = "label_names" if files is CIFAR10_FILES else "fine_label_names"
    if official:
        _check_official_batches(path, members, cifar100=files is CIFAR100_FILES)

    arrays = {}
    for split in SPLITS:
        images, labels = [], []
        for name in files[split]:
            if name not in members:
                raise StageError(f"{path}: CIFAR batch '{name}' is missing")
            batch = _unpickle(path, name, members[name][1])
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        arrays[f"{split}_images"] = _resize(np.concatenate(images), image_size)
        arrays[f"{split}_labels"] = np.concatenate(labels)
    meta = _unpickle(path, files["meta"], members[files["meta"]][1])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    return arrays, classes


def _check_official_batches(path: Path, members: dict, cifar100: bool) -> None:
    """Per-batch MD5s from torchvision's dataset classes, checked before any unpickling."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if cifar100 else CIFAR10
    for name, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]:
        if name not in members or hashlib.md5(members[name][1]).hexdigest() != md5:
            raise StageError(f"{path}: batch '{name}' is missing or fails its MD5 check")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [np.asarray(Image.fromarray(im.transpose(1, 2, 0)).resize((size, size),
                                                                    Image.Resampling.BILINEAR))
           for im in images]
    return np.stack(out).transpose(0, 3, 1, 2).copy()


# --- the image-folder layout --------------------------------------------------------------------

def read_image_folder(path: Path, image_size: int):
    """train/<class>/<file> and test/<class>/<file>, at any depth below the archive's root."""
    found: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = {s: {} for s in SPLITS}
    for name, data in iter_members(path):
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # .DS_Store, ._* resource forks and the like
        if data is None:  # a folder: train/<class>/ registers the class, even if empty
            if len(parts) >= 2 and parts[-2] in SPLITS:
                found[parts[-2]].setdefault(parts[-1], [])
            continue
        if len(parts) < 3 or parts[-3] not in SPLITS:
            continue  # README files, licences, anything outside train/ and test/
        split, cls = parts[-3], parts[-2]
        found[split].setdefault(cls, []).append((name, _decode(path, name, data, image_size)))

    for split in SPLITS:
        if not found[split]:
            raise StageError(f"{path}: no {split}/<class>/<image> files found "
                             "(expected train/<class>/* and test/<class>/*)")
    for split in SPLITS:
        empty = sorted(cls for cls, files in found[split].items() if not files)
        if empty:
            raise StageError(f"{path}: class folder {split}/{empty[0]}/ holds no images")
    classes = sorted(found["train"])
    missing = sorted(set(classes) - set(found["test"]))
    extra = sorted(set(found["test"]) - set(classes))
    if missing or extra:
        raise StageError(f"{path}: train/ and test/ differ in classes "
                         f"(missing in test/: {missing or 'none'}; only in test/: {extra or 'none'})")

    arrays = {}
    for split in SPLITS:
        images, labels = [], []
        for index, cls in enumerate(classes):
            files = sorted(found[split][cls])  # by member name: independent of archive order
            images += [im for _, im in files]
            labels += [index] * len(files)
        arrays[f"{split}_images"] = np.stack(images).transpose(0, 3, 1, 2).copy()
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    return arrays, classes


def _decode(archive: Path, name: str, data: bytes, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise StageError(f"{archive}: cannot read image '{name}' ({exc})") from None


if __name__ == "__main__":
    errors.run(main)
