"""Clear one-line errors instead of tracebacks for the failures a user can fix."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class StageError(Exception):
    """A failure the user can act on: bad data, an unreachable source, a limit of the data."""

    exit_code = 1


class ParamsError(StageError):
    """params.yaml is invalid. Exit code 2, like a command-line usage error."""

    exit_code = 2


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); turn a StageError into one line on stderr and its exit code.

    SIGTERM (sent by `dvc queue kill`, schedulers, `kill`) is handled like Ctrl-C: the stage
    stops where it is (or right after the MLflow call it is in, see `uninterrupted`), its
    MLflow run is marked KILLED, and training resumes from its last checkpoint when run again.
    """
    stage = Path(main.__globals__["__file__"]).stem  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        main()
    except StageError as exc:
        print(f"error ({stage}): {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        again = "run again to resume" if stage == "train" else "run again"  # only train checkpoints
        print(f"error ({stage}): interrupted; {again}", file=sys.stderr)
        sys.exit(130)


_held = 0  # how many `uninterrupted` blocks are open
_pending = False  # a Ctrl-C or SIGTERM arrived inside one


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then raise KeyboardInterrupt.

    For MLflow calls: a KeyboardInterrupt in the middle of a write to a SQLite store leaves that
    write's transaction open and the database locked, so the call that then marks the run
    KILLED fails with "database is locked" and the run stays RUNNING for ever.
    """
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if _held == 0 and _pending:
        _pending = False
        raise KeyboardInterrupt


def _interrupt(signum, frame) -> None:
    global _pending
    if _held:
        _pending = True
        return
    raise KeyboardInterrupt
