"""Where this process runs: the repository root, the CPU threads it may use, its device.

The repository root is $DVC_ROOT when DVC sets it: a queued `dvc exp run` works in a temporary
copy under .dvc/tmp/exps, while relative paths in params.yaml (data.source, model.pretrained),
the MLflow store and the resume checkpoints belong to the main repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.errors import StageError


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def cpu_threads() -> int:
    """The cores this process may use, shared among DVC's running queue workers.

    `dvc queue start -j N` runs N experiments at once; N processes that each use every core
    oversubscribe them, and PyTorch's spinning OpenMP threads then collapse (docs/experiments.md,
    "Parallel queues": on 2 cores, two 2-thread trainings together were slower than one alone). Each
    worker leaves a pid file in DVC's queue folder; the live ones are counted.
    """
    cores = len(os.sched_getaffinity(0))
    workers = 0
    for pid_file in (repo_root() / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
            workers += 1
        except PermissionError:
            workers += 1  # alive, but not ours to signal
        except (ValueError, OSError):
            pass  # a stale file of a worker that has gone
    return max(1, cores // max(1, workers))


def resolve_device(choice: str):
    """train.device, for train and evaluate alike: auto = the GPU when there is one."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device = cuda, but PyTorch sees no CUDA GPU here (use auto or cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
