"""Where this process runs: the repository root, its share of the CPU's cores, its device.

The repository root is $DVC_ROOT when DVC sets it: a queued `dvc exp run` works in a temporary
copy under .dvc/tmp/exps, while relative paths in params.yaml (data.source, model.pretrained),
the MLflow store and the resume checkpoints belong to the main repository.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path

from stages.errors import StageError


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


# Every process that computes with PyTorch on the CPU (train, evaluate) leaves a file here while
# it runs, so that each can see how many share the machine. It is machine-wide on purpose: two
# clones, a queue worker's temporary workspace and the test suite all meet in the same folder.
SHARING = Path(
    os.environ.get("OVERFIT_SHARING_DIR") or Path(tempfile.gettempdir()) / "overfit-sharing"
)


class CoreShare:
    """This process's share of the cores among the pipeline's processes computing on this machine.

    Alone, a training uses every core, with PyTorch's own settings. With company, each takes
    cores // (processes computing), usually one thread: a single thread has no OpenMP team to wait
    for, so two trainings share the cores instead of spinning against each other
    (docs/speed.md, "A shared machine"). The count is read again at most every `every` seconds,
    from the loops that do the work (`keep_fair`): the threads follow the company as it comes and
    goes. `fixed` (train.threads) pins this process's threads; it still counts for the others.

        with CoreShare():
            ...  # train; call keep_fair() between batches
    """

    def __init__(self, fixed: int = 0, every: float = 1.0, folder: Path | None = None):
        self.fixed, self.every = fixed, every
        self.folder = folder or SHARING
        self.cores = len(os.sched_getaffinity(0))
        self.file = self.folder / f"{os.getpid()}-{_started(os.getpid())}"
        self.checked = -math.inf
        self.fewest = fixed or self.cores  # the fewest threads used since fewest_since_asked()

    def __enter__(self) -> CoreShare:
        global _share
        try:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                self.folder.chmod(0o1777)  # every user's processes meet here, as in /tmp
            self.file.touch()
        except OSError as error:  # a folder we may not write: counted by no one, still counting
            print(
                f"warning: {self.folder}: {error.strerror}; the other trainings can't see this one"
            )
        self.outer, _share = _share, self
        self.refresh(force=True)
        return self

    def __exit__(self, *exc) -> None:
        global _share
        _share = self.outer  # a share entered inside another (a stage's main under pytest)
        if self.file != getattr(self.outer, "file", None):
            with contextlib.suppress(OSError):  # never written (the warning above), or gone
                self.file.unlink()
        if self.outer is not None:
            self.outer.refresh(force=True)

    def processes(self) -> int:
        """The pipeline's processes computing on this machine now, this one included; the files
        of processes that have gone (killed before they could remove theirs) are removed."""
        alive = 0
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            pid, _, started = entry.name.partition("-")
            if pid.isdigit() and _started(int(pid)) == started:
                alive += int(entry != self.file)
            else:
                with contextlib.suppress(OSError):  # another user's, in the sticky folder
                    entry.unlink()  # gone, or its pid reused by another program
        return 1 + alive  # this one, whether or not its file could be written

    def threads(self) -> int:
        return self.fixed or max(1, self.cores // self.processes())

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.checked >= self.every:
            self.checked = now
            wanted = self.threads()
            self.fewest = min(self.fewest, wanted)
            if wanted != torch_threads():
                import torch

                torch.set_num_threads(wanted)

    def fewest_since_asked(self) -> int:
        """The fewest threads this process computed with since the last call: an epoch that
        shared the cores shows it (and another thread count sums in another order)."""
        fewest, self.fewest = self.fewest, torch_threads()
        return fewest


_share: CoreShare | None = None  # the process's share while one is entered


def keep_fair() -> None:
    """Between batches: follow the company (a no-op outside a CoreShare, and cheap inside one)."""
    if _share is not None:
        _share.refresh()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot; "" if there is no such process): with
    the pid, a name that no later process reuses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command's name


def resolve_device(choice: str):
    """train.device, for train and evaluate alike: auto = the GPU when there is one."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device = cuda, but PyTorch sees no CUDA GPU here (use auto or cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
