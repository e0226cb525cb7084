"""Stage `download`: a data source → byte-stable uint8 arrays in data/raw/.

Reads params: data.source, data.sha256, data.image_size.

A source is one of
  cifar10, cifar100        the official archives, fetched with torchvision's download utilities
                           and checked against their published MD5;
  a path, file:// or http(s):// URL to
    a .tar.gz in the CIFAR python-pickle layout (data_batch_1…5 + test_batch, or train + test), or
    an image-folder archive (.tar.gz, .tar, .zip) or folder: train/<class>/*, test/<class>/*,
    any image Pillow reads, any size, RGB or grayscale.

Checksums: the sha256 of an archive, or the tree hash of a folder (see `tree_sha256`), is recorded
in data/raw/meta.json and, when data.sha256 is set, must equal it.

Unpickling can run code, so CIFAR pickles are unpickled only once their bytes are vouched for: by
the published MD5s (whole archive and each batch) for the official archives, by data.sha256 for
any other archive; without it the stage refuses. An unpickler that admits numpy arrays only is a
second line of defence.

Downloads are written to data/downloads/<name>.part and renamed to <name> only when complete (and,
for the official archives, MD5-verified), so a file under its final name is always whole and can
be reused. A broken, short or corrupted transfer is retried; an interrupted one leaves nothing.

Archives are read in place, member by member: nothing is extracted to disk, so no member can land
outside a folder. Links (tar or zip members, or entries of a folder source) are refused.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages import errors, io as sio, params as P
from stages.errors import StageError
from stages.runtime import repo_root

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
    data = P.load().data
    path, official_md5 = fetch(data.source)
    sha256 = verify(path, data.sha256)
    fmt, arrays, classes = read(path, data, sha256, official_md5)
    write_outputs(data, fmt, arrays, classes, sha256, official_md5)


def verify(path: Path, expected: str | None) -> str:
    """The source's sha256 (a folder's tree hash), which must equal data.sha256 when that is set."""
    sha256 = tree_sha256(path) if path.is_dir() else sio.sha256_of(path)
    if expected and sha256 != expected.lower():
        raise StageError(
            f"{path}: sha256 is {sha256}, but data.sha256 expects {expected.lower()} "
            f"(a new source? pin it with -S data.sha256={sha256}, or skip the check with "
            "-S data.sha256=null)"
        )
    return sha256


def read(path: Path, data: P.Data, sha256: str, official_md5: str | None):
    """(format, arrays, classes) of a CIFAR pickle archive or an image folder."""
    if path.is_file() and _is_tar(path) and _cifar_pickle_layout(path):
        if official_md5 is None and not data.sha256:
            # Checked before a single byte is unpickled: only the user can vouch for these bytes.
            raise StageError(
                f"{path} holds pickled CIFAR batches, and unpickling can run code: set data.sha256 "
                f"to vouch for this archive (its sha256 is {sha256})"
            )
        arrays, classes = read_cifar_pickle(path, data.image_size, official_md5 is not None)
        return "cifar-pickle", arrays, classes
    arrays, classes = read_image_folder(path, data.image_size)
    return "image-folder", arrays, classes


def write_outputs(data: P.Data, fmt: str, arrays: dict, classes: list, sha256: str, md5) -> None:
    for split in SPLITS:
        sio.save_array(OUT / f"{split}_images.npy", arrays[f"{split}_images"])
        sio.save_array(OUT / f"{split}_labels.npy", arrays[f"{split}_labels"])
    sio.write_json(
        OUT / "meta.json",
        {
            "source": data.source,
            "format": fmt,
            "sha256": sha256,  # always recorded (a tree hash for a folder), so it can be pinned later
            "md5": md5,
            "classes": classes,
            "image_size": data.image_size,
            "train_count": len(arrays["train_labels"]),
            "test_count": len(arrays["test_labels"]),
        },
    )
    print(
        f"download: {len(arrays['train_labels'])} train + {len(arrays['test_labels'])} test "
        f"images, {len(classes)} classes, {fmt}, sha256 {sha256}"
    )


def tree_sha256(folder: Path) -> str:
    r"""The content hash of a folder source, to pin as data.sha256 like an archive's sha256.

    sha256 over one line "<relative path>\0<sha256 of the file's bytes>\n" per regular file below
    the folder, in sorted order of the relative POSIX paths (UTF-8). Folders, timestamps and
    permissions don't count, so two copies of the same files have the same hash.
    """
    digest = hashlib.sha256()
    for name, entry in _folder_entries(folder):
        if entry.is_file():
            # surrogateescape: a file name that is not valid UTF-8 still hashes, as its raw bytes
            digest.update(f"{name}\0{sio.sha256_of(entry)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# --- where the bytes come from ------------------------------------------------------------------


def fetch(source: str) -> tuple[Path, str | None]:
    """Return a local file or folder for the source, and the MD5 it was verified against."""
    if source in OFFICIAL:
        url, md5 = OFFICIAL[source]["url"], OFFICIAL[source]["md5"]
        name = Path(urlparse(url).path).name
        _download(url, name, md5)
        return DOWNLOADS / name, md5

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
        path = repo_root() / Path(source).expanduser()
    else:
        raise StageError(
            f"data.source = {source!r}: unknown scheme '{scheme}' "
            "(allowed: cifar10, cifar100, a path, file://, http://, https://)"
        )
    if not path.exists():
        raise StageError(f"data.source = {source!r}: {path} does not exist")
    return path, None


# Attempts for a transient failure (timeout, reset, short transfer, HTTP 429/5xx), backing off 1, 2 s.
RETRIES = 3
TIMEOUT = 30  # seconds a connect or a read may hang before the attempt counts as failed
CHUNK = 1 << 16


class _CorruptDownload(Exception):
    """An official archive failed its MD5 right after downloading: a transfer cut short or damaged."""


def _download(url: str, name: str, md5: str | None) -> None:
    """Fetch url into DOWNLOADS/name (MD5-checked when md5 is given), retrying transient failures.

    The bytes go to DOWNLOADS/name.part, renamed to `name` only when complete, so a file under the
    final name is always whole.
    """
    target = DOWNLOADS / name
    if target.exists():
        if md5 is None:
            return  # a user URL fetched before (complete, see above); data.sha256 guards its content
        if _md5_matches(target, md5):
            return
        print(f"download: {target} fails its MD5 {md5}; downloading it again", flush=True)
        target.unlink()
    DOWNLOADS.mkdir(parents=True, exist_ok=True)

    for attempt in range(1, RETRIES + 1):
        try:
            _attempt(url, target, md5)
            return
        except (urllib.error.URLError, OSError, http.client.HTTPException, _CorruptDownload) as exc:
            if attempt == RETRIES or not _transient(exc):
                raise _failure(url, md5, exc) from None
            delay = 2 ** (attempt - 1)
            print(f"download: {url} failed ({_reason(exc)}); retrying in {delay} s", flush=True)
            time.sleep(delay)


def _attempt(url: str, target: Path, md5: str | None) -> None:
    part = target.with_name(target.name + ".part")
    try:
        if md5 is None:
            _stream(url, part)
        else:
            _download_official(url, part, md5)
        os.replace(part, target)  # a rename is atomic: `target` appears complete or not at all
    except BaseException:  # also Ctrl-C and SIGTERM (KeyboardInterrupt): no partial file stays
        part.unlink(missing_ok=True)
        raise


def _stream(url: str, part: Path) -> None:
    """GET url into `part` chunk by chunk; a body shorter than its Content-Length is an error.

    (http.client itself just stops reading when the server closes early, so a short transfer
    would otherwise look complete.)
    """
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response, open(part, "wb") as out:
        declared = response.length  # Content-Length; None when the server sends none (or chunks)
        received = 0
        while chunk := response.read(CHUNK):
            out.write(chunk)
            received += len(chunk)
    if declared is not None and received < declared:
        raise urllib.error.ContentTooShortError(
            f"the server sent {received} of {declared} bytes, then closed the connection", None
        )


def _download_official(url: str, part: Path, md5: str) -> None:
    from torchvision.datasets.utils import download_url

    # torchvision opens the URL without a timeout: a stalled server would hang the stage for ever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TIMEOUT)
    try:
        download_url(url, str(part.parent), filename=part.name, md5=md5)
    except RecursionError as exc:  # too many redirects (a RuntimeError too, but not a bad transfer)
        raise StageError(f"could not download {url} ({exc})") from None
    except RuntimeError as exc:
        # torchvision's "File not found or corrupted.": the bytes fail the MD5, as a short or
        # damaged transfer does; worth another try.
        raise _CorruptDownload(str(exc)) from None
    finally:
        socket.setdefaulttimeout(previous)


def _md5_matches(path: Path, md5: str) -> bool:
    from torchvision.datasets.utils import check_integrity

    return check_integrity(str(path), md5)


def _transient(exc: BaseException) -> bool:
    """Worth another try: a server error or a broken transfer. Not: no network, no such file."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    if isinstance(
        exc, (_CorruptDownload, urllib.error.ContentTooShortError, http.client.IncompleteRead)
    ):
        return True
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, (TimeoutError, ConnectionResetError, http.client.IncompleteRead))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    return str(getattr(exc, "reason", None) or exc)


def _failure(url: str, md5: str | None, exc: BaseException) -> StageError:
    if isinstance(exc, _CorruptDownload):
        return StageError(
            f"{url}: the download does not match its published MD5 {md5} "
            f"(tried {RETRIES} times); nothing was kept"
        )
    return StageError(
        f"could not download {url} ({_reason(exc)}). Without internet, use the bundled CIFAR-10 "
        f"(dvc exp run -S data.source={P.BUNDLED} -S data.sha256={P.BUNDLED_SHA256}) or another "
        "local archive or folder (docs/data.md)"
    )


# --- archives, read member by member --------------------------------------------------------------


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError):  # EOFError: a gzip file cut short within its first bytes
        return False


def _looks_like_archive(path: Path) -> bool:
    """Zip or gzip magic bytes, or an archive's file name: unreadable, it must be damaged."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return magic in (b"PK", b"\x1f\x8b") or path.name.lower().endswith(
        (".zip", ".tar.gz", ".tgz", ".tar")
    )


def _link_refused(archive: Path, name: str) -> StageError:
    return StageError(
        f"{archive}: member '{name}' is a link; links are refused (they can point outside the data)"
    )


def iter_members(path: Path) -> Iterator[tuple[str, bytes | None]]:
    """Yield (member name, bytes) for every regular file of a tar, zip or folder, and
    (name ending in '/', None) for every folder, so that empty class folders can be named."""
    if path.is_dir():
        for name, entry in _folder_entries(path):
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
                        raise _link_refused(path, member.name)
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
                    # A zip stores a Unix file type in the high 16 bits (zip -y, Python's zipfile).
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise _link_refused(path, info.filename)
                    yield (info.filename, None) if info.is_dir() else (info.filename, zf.read(info))
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise StageError(f"{path}: truncated or corrupt archive ({exc})") from None
    elif _looks_like_archive(path):
        raise StageError(f"{path}: truncated or corrupt archive (neither tar nor zip can read it)")
    else:
        raise StageError(f"{path}: not a folder, a tar archive or a zip archive")


def _folder_entries(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of everything below a folder, sorted; links are refused.

    A link inside the data could point anywhere on the machine, so it is refused like a link in
    an archive, before it is read. The folder itself may be reached through a link.
    """
    for name, entry in sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*")):
        if entry.is_symlink():
            raise StageError(
                f"{folder}: '{name}' is a symbolic link; "
                "links are refused (they can point outside the data)"
            )
        yield name, entry


def _check_member_name(archive: Path, name: str) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("\\") or ":" in pure.parts[0]:
        raise StageError(f"{archive}: member '{name}' would land outside the extraction folder")


# --- the CIFAR python-pickle layout -------------------------------------------------------------

CIFAR10_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "meta": "batches.meta",
}
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
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(archive: Path, name: str, data: bytes) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
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
    out = [
        np.asarray(
            Image.fromarray(im.transpose(1, 2, 0)).resize((size, size), Image.Resampling.BILINEAR)
        )
        for im in images
    ]
    return np.stack(out).transpose(0, 3, 1, 2).copy()


# --- the image-folder layout --------------------------------------------------------------------


# Images are told by their name, as torchvision's ImageFolder does (its IMG_EXTENSIONS): a notes
# file or a .DS_Store beside them is skipped and counted, while a .jpg that cannot be decoded is an
# error naming it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image_folder(path: Path, image_size: int):
    """train/<class>/<file> and test/<class>/<file>, at any depth below the archive's root."""
    found: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = {s: {} for s in SPLITS}
    skipped: list[str] = []
    for name, data in iter_members(path):
        parts = PurePosixPath(name).parts
        # .DS_Store, ._* resource forks, __MACOSX/: hidden, never images or classes
        hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
        if data is None:  # a folder: train/<class>/ registers the class, even if empty
            if len(parts) >= 2 and parts[-2] in SPLITS and not hidden:
                found[parts[-2]].setdefault(parts[-1], [])
            continue
        if hidden or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(name)  # and README.md, notes.txt, Thumbs.db, …
            continue
        if len(parts) < 3 or parts[-3] not in SPLITS:
            skipped.append(name)  # an image outside train/<class>/ and test/<class>/
            continue
        split, cls = parts[-3], parts[-2]
        found[split].setdefault(cls, []).append((name, _decode(path, name, data, image_size)))
    if skipped:
        examples = ", ".join(sorted(skipped)[:3]) + (", …" if len(skipped) > 3 else "")
        print(
            f"download: skipped {len(skipped)} file(s) that are not images by their name or lie "
            f"outside train/<class>/ and test/<class>/ ({examples})"
        )

    for split in SPLITS:
        if not found[split]:
            raise StageError(
                f"{path}: no {split}/<class>/<image> files found "
                "(expected train/<class>/* and test/<class>/*)"
            )
    for split in SPLITS:
        empty = sorted(cls for cls, files in found[split].items() if not files)
        if empty:
            raise StageError(f"{path}: class folder {split}/{empty[0]}/ holds no images")
    classes = sorted(found["train"])
    missing = sorted(set(classes) - set(found["test"]))
    extra = sorted(set(found["test"]) - set(classes))
    if missing or extra:
        raise StageError(
            f"{path}: train/ and test/ differ in classes "
            f"(missing in test/: {missing or 'none'}; only in test/: {extra or 'none'})"
        )

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
