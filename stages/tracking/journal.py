"""The pipeline's run written to a journal instead of MLflow, for a machine without MLflow.

Tracking URI `journal:<folder>` ($MLFLOW_TRACKING_URI or `mlflow.tracking_uri`; a relative folder
is under the repository root): train and evaluate log exactly what they log to MLflow, but each
run goes to <folder>/<run id>/journal.jsonl, one JSON line per call (the run's start with its
experiment, name and tags; its params; metrics with their step and time; tags; artifacts and the
model's checkpoint, copied under files/ beside it; its end and status). Nothing here imports
mlflow. `python -m stages.tracking.replay <folder>` puts every run into an MLflow store later.

The lines are the calls of the missed-logging journal of runs.py (data/mlflow-missed/), plus
`start` and `params`: replay.py sends both kinds the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import StageError, uninterrupted
from stages.runtime import repo_root

SCHEME = "journal:"
JOURNAL = "journal.jsonl"


def is_journal(uri: str) -> bool:
    return uri.startswith(SCHEME)


def folder_of(uri: str) -> Path:
    """The folder a `journal:<folder>` URI names; a relative one is under the repository root."""
    folder = Path(uri[len(SCHEME) :]).expanduser()
    return folder if folder.is_absolute() else repo_root() / folder


@dataclass(frozen=True)
class Info:
    """What the stages read of a run: the same names as MLflow's run.info."""

    run_id: str
    experiment_id: str  # the experiment's name: a journal has no experiment ids


class Run:
    """One journaled run: every logging call appends one line to its journal."""

    def __init__(self, folder: Path, run_id: str, experiment: str):
        self.folder = folder / run_id
        self.info = Info(run_id, experiment)

    def write(self, line: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with uninterrupted(), open(self.folder / JOURNAL, "a") as f:  # one line, whole or not
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def lines(self) -> list[dict[str, Any]]:
        path = self.folder / JOURNAL
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def keep_file(self, path: Path) -> str:
        """A copy of the file beside the journal (the original is replaced by the next run); its
        path relative to the run's folder."""
        kept = Path("files") / str(len(self.lines())) / Path(path).name
        (self.folder / kept).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, self.folder / kept)
        return str(kept)

    # --- the calls of stages/tracking/runs.py's Tracker -------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        self.write({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": timestamp})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.write({"kind": "tags", "tags": tags})

    def log_artifact(self, path: Path, folder: str | None) -> None:
        self.write({"kind": "artifact", "file": self.keep_file(path), "folder": folder})

    def log_model(self, model, example_input, checkpoint: Path) -> None:
        """The checkpoint only: replay rebuilds the model from it and logs it to MLflow."""
        self.write({"kind": "model", "checkpoint": self.keep_file(checkpoint)})

    def last_step(self, metric: str) -> int:
        steps = [
            line["step"] or 0
            for line in self.lines()
            if line["kind"] == "metrics" and metric in line["metrics"]
        ]
        return max(steps, default=0)


def start(
    uri: str,
    experiment: str,
    run_name: str | None,
    tags: dict[str, str],
    params: dict[str, str],
    run_id: str | None = None,
) -> Run:
    """A new run: its start line (experiment, name, tags, time) and its params; a new id unless
    `run_id` is given (a run made of an older record keeps the same id when made again)."""
    run = Run(folder_of(uri), run_id or uuid.uuid4().hex, experiment)
    run.write(
        {
            "kind": "start",
            "experiment": experiment,
            "run_name": run_name,
            "tags": tags,
            "time": now(),
        }
    )
    run.write({"kind": "params", "params": params})
    return run


def reopen(uri: str, run_id: str) -> Run:
    """A run journaled before (evaluate's, or a resumed training's): it must be there."""
    folder = folder_of(uri)
    if not (folder / run_id / JOURNAL).exists():
        raise StageError(f"run {run_id} is not in the journal {folder} (tracking URI {uri})")
    start_line = json.loads((folder / run_id / JOURNAL).read_text().splitlines()[0])
    return Run(folder, run_id, start_line["experiment"])


@contextmanager
def ended_by_outcome(end: Callable[[str], None]) -> Iterator[None]:
    """Run the block, then `end(status)`: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any other
    error). A journaled run and an MLflow run (runs.py) both end this way."""
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        end(status)


def now() -> int:
    """Milliseconds since the epoch, as MLflow keeps times."""
    return int(time.time() * 1000)


# --- reading a journal back: its runs, in the shape MLflow gives them ---------------------------


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    run_name: str | None
    experiment_id: str
    status: str  # the last end's status; RUNNING while a stage still has the run open
    start_time: int
    end_time: int | None


@dataclass(frozen=True)
class RunData:
    params: dict[str, str]
    metrics: dict[str, float]  # each metric's latest value (its highest step), as MLflow's
    tags: dict[str, str]


@dataclass(frozen=True)
class JournaledRun:
    """A journaled run read back with MLflow's names (run.info, run.data): the reports read it
    as they read an MLflow run."""

    info: RunInfo
    data: RunData


def read_run(folder: Path) -> JournaledRun:
    """The run journaled in `folder` (<journal>/<run id>/)."""
    lines = []
    for text in (folder / JOURNAL).read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # a line cut short by a killed process: the run ends there
            break
    start, params, metrics, steps, tags = lines[0], {}, {}, {}, dict(lines[0]["tags"])
    ends = [line for line in lines if line["kind"] == "end"]
    for line in lines:
        if line["kind"] == "params":
            params.update(line["params"])
        elif line["kind"] == "tags":
            tags.update(line["tags"])
        elif line["kind"] == "metrics":
            step = line["step"] or 0
            for key, value in line["metrics"].items():
                if step >= steps.get(key, step):
                    metrics[key], steps[key] = value, step
    if start["run_name"]:
        tags.setdefault("mlflow.runName", start["run_name"])
    return JournaledRun(
        RunInfo(
            run_id=folder.name,
            run_name=start["run_name"],
            experiment_id=start["experiment"],
            status=ends[-1]["status"] if lines[-1]["kind"] == "end" else "RUNNING",
            start_time=start["time"],
            end_time=ends[-1].get("time") if ends else None,
        ),
        RunData(params, metrics, tags),
    )


class Reader:
    """A journal's runs, for the reports (stages/experiments/reports: finished_runs)."""

    def __init__(self, uri: str):
        self.tracking_uri = uri
        self.folder = folder_of(uri)

    def experiments(self) -> set[str]:
        return {run.info.experiment_id for run in self.all_runs()}

    def all_runs(self) -> list[JournaledRun]:
        return [read_run(path.parent) for path in sorted(self.folder.glob(f"*/{JOURNAL}"))]

    def runs(
        self, experiment: str, prefix: str | None = None, name: str | None = None
    ) -> list[JournaledRun]:
        """The runs of `experiment` whose DVC experiment name is `name`, or starts with
        `<prefix>-` (every run without either): what finished_runs asks MLflow for."""

        def wanted(run: JournaledRun) -> bool:
            exp_name = run.data.tags.get("dvc.exp_name")
            if name:
                return exp_name == name
            return not prefix or (exp_name or "").startswith(f"{prefix}-")

        return [r for r in self.all_runs() if r.info.experiment_id == experiment and wanted(r)]
