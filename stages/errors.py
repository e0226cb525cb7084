"""Clear one-line errors instead of tracebacks for the failures a user can fix."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable


class StageError(Exception):
    """A failure the user can act on: bad data, an unreachable source, a limit of the data."""

    exit_code = 1


class ParamsError(StageError):
    """params.yaml is invalid. Exit code 2, like a command-line usage error."""

    exit_code = 2


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); turn a StageError into one line on stderr and its exit code.

    SIGTERM (sent by `dvc queue kill`, schedulers, `kill`) is handled like Ctrl-C: the stage
    stops where it is, its MLflow run is marked KILLED, and training resumes from its last
    checkpoint when run again.
    """
    stage = Path(main.__globals__["__file__"]).stem  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except StageError as exc:
        print(f"error ({stage}): {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"error ({stage}): interrupted; run again to resume", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
