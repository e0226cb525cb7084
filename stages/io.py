"""Writing outputs so that DVC can trust them: atomically, and with reproducible bytes.

A stage killed half-way must never leave a half-written file for DVC to cache, so every file is
written to a temporary name in the same folder and renamed into place (a rename is atomic).
Bytes are reproducible: `.npy` files carry no timestamps (unlike `np.savez`), JSON keys are
sorted, and torch checkpoints are serialized to memory first, because `torch.save` writes the
file name into the archive (saving to `x.tmp` and renaming would give other bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C, SIGTERM: the old file stays, no debris
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_array(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def load_array(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def save_torch(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: Path) -> Any:
    """Load a checkpoint without running pickled code: tensors and plain containers only."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_figure(path: Path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
