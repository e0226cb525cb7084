"""The pipeline's MLflow run: open it with its params and tags, log to it, end it by its outcome.

One pipeline run = one MLflow run: train opens it and writes its id to models/run.json, and
evaluate logs into the same run. If the tracking server stops answering mid-run, training goes
on: from the first failed call on, every logging call is written to a journal,
data/mlflow-missed/<run id>/journal.json under the repository root, which is sent once more when
the stage ends and can be replayed later with `python -m stages.tracking.replay`.

The stages log through this module's functions only; behind them is a Tracker. With a tracking
URI `journal:<folder>` (a machine without MLflow) the run is opened by stages/tracking/journal.py
and every call goes to its journal instead, mlflow never imported; otherwise, MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stages import io as sio, params as P
from stages.errors import uninterrupted
from stages.runtime import repo_root
from stages.tracking import flavour, journal, store
from stages.tracking.replay import MISSED, replay
from stages.tracking.store import check_reachable, tracking_uri

if TYPE_CHECKING:
    import mlflow

# mlflow is imported where it is first used, not here: `import mlflow` takes seconds (it pulls in
# pandas, its GenAI and gateway modules), and a stage should start its work, and the tracking
# server check, without waiting for it.


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_tags(params: P.Params) -> dict[str, str]:
    flat = P.flatten(params)
    tags = {
        "git.commit": _git("rev-parse", "HEAD"),
        "mlflow.source.git.commit": _git("rev-parse", "HEAD"),
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "params_hash": hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16],
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    # The commit the run starts from: DVC's baseline for an experiment, else the checked-out one.
    tags["dvc.baseline_rev"] = os.environ.get("DVC_EXP_BASELINE_REV") or tags["git.commit"]
    return tags


@contextmanager
def start_run(
    params: P.Params, data_sha256: str | None, resume_id: str | None = None
) -> Iterator[mlflow.ActiveRun | journal.Run]:
    """Open the pipeline run, with every param flattened under its params.yaml name; or reopen
    `resume_id`, the run of an interrupted training that is being resumed."""
    uri = tracking_uri(params.mlflow)
    if journal.is_journal(uri):
        with _journaled(
            journal.reopen(uri, resume_id)
            if resume_id
            else journal.start(
                uri,
                params.mlflow.experiment,
                os.environ.get("DVC_EXP_NAME"),
                _start_tags(params, data_sha256),
                {k: str(v) for k, v in P.flatten(params).items()},  # as mlflow.log_params has them
            )
        ) as run:
            yield run
        return
    check_reachable(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    if resume_id:
        with uninterrupted():
            run = mlflow.start_run(run_id=resume_id)
        with _ended_by_outcome(run):
            yield run
        return
    tags = _start_tags(params, data_sha256)
    with uninterrupted():
        experiment_id = store.experiment_id(params.mlflow.experiment, uri)
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME"), tags=tags
        )
    with _ended_by_outcome(run):
        with uninterrupted():
            mlflow.log_params(P.flatten(params))
        yield run


def _start_tags(params: P.Params, data_sha256: str | None) -> dict[str, str]:
    tags = run_tags(params)
    if data_sha256:
        tags["data.sha256"] = data_sha256
    return tags


@contextmanager
def resume_run(run_id: str, mlflow_params: P.Mlflow) -> Iterator[mlflow.ActiveRun | journal.Run]:
    uri = tracking_uri(mlflow_params)
    if journal.is_journal(uri):
        with _journaled(journal.reopen(uri, run_id)) as run:
            yield run
        return
    check_reachable(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    with uninterrupted():
        run = mlflow.start_run(run_id=run_id)
    with _ended_by_outcome(run):
        yield run


# --- where the logging calls go -------------------------------------------------------------------


class Tracker(Protocol):
    """What the stages log to: MLflow (MlflowTracker, below) or a journal (journal.Run)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, folder: str | None) -> None: ...
    def log_model(self, model, example_input, checkpoint: Path) -> None: ...
    def last_step(self, metric: str) -> int: ...


@contextmanager
def _journaled(run: journal.Run) -> Iterator[journal.Run]:
    """Send the logging calls to the journaled run while it is open; ended by its outcome."""
    global _tracker
    _tracker = run
    try:
        with journal.ended_by_outcome(
            lambda status: run.write({"kind": "end", "status": status, "time": journal.now()})
        ):
            yield run
    finally:
        _tracker = MLFLOW


@contextmanager
def _ended_by_outcome(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any other error); then send
    whatever a dead server missed once more, or say where it is kept."""
    import mlflow

    global _journal
    _journal = None

    def end(status: str) -> None:
        _call(
            lambda: mlflow.end_run(status),
            lambda: {"kind": "end", "status": status},
            run.info.run_id,
        )
        if _journal is not None:
            _flush_journal()

    with journal.ended_by_outcome(end):
        yield run


# --- logging that a dead tracking server cannot stop ----------------------------------------------

_journal: dict | None = None  # the current run's missed calls, once the server has failed


def _call(send, record, run_id: str | None = None) -> None:
    """Send one logging call; after the first failure, journal it (and every later one) instead.
    `record()` makes the journal entry; it runs only when the call is journaled."""
    global _journal
    if _journal is None:
        try:
            with uninterrupted():  # a write cut in half would leave a SQLite store locked
                send()
            return
        except Exception as exc:
            import mlflow

            run_id = run_id or mlflow.active_run().info.run_id  # type: ignore[union-attr]
            print(
                f"warning: MLflow logging failed ({type(exc).__name__}: {str(exc)[:200]}); "
                f"training goes on, and the logging is kept in {MISSED}/{run_id}/",
                file=sys.stderr,
                flush=True,
            )
            _journal = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run_id, "calls": []}
    _journal["calls"].append(record())
    sio.write_json(_journal_dir(_journal["run_id"]) / "journal.json", _journal)


def _journal_dir(run_id: str) -> Path:
    return repo_root() / MISSED / run_id


def _keep_file(path: Path) -> str:
    """A copy of a file for the journal: the original can be replaced by the next run."""
    folder = _journal_dir(_journal["run_id"]) / "files" / str(len(_journal["calls"]))  # type: ignore[index]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, folder / Path(path).name)
    return str(folder / Path(path).name)


def _flush_journal() -> None:
    folder = _journal_dir(_journal["run_id"])  # type: ignore[index]
    try:
        replay(folder)
        print(
            f"MLflow: the missed logging of run {_journal['run_id']} was sent after all",  # type: ignore[index]
            file=sys.stderr,
        )
    except Exception:
        print(
            f"warning: MLflow run {_journal['run_id']} is incomplete: "  # type: ignore[index]
            f"{len(_journal['calls'])} logging calls are kept in {folder}; "  # type: ignore[index]
            "when the server is back: python -m stages.tracking.replay",
            file=sys.stderr,
        )


class MlflowTracker:
    """The MLflow run that start_run or resume_run opened (mlflow's active run)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        import mlflow

        _call(
            lambda: mlflow.log_metrics(metrics, step=step, timestamp=timestamp),
            lambda: {"kind": "metrics", "metrics": metrics, "step": step, "timestamp": timestamp},
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        _call(lambda: mlflow.set_tags(tags), lambda: {"kind": "tags", "tags": tags})

    def log_artifact(self, path: Path, folder: str | None) -> None:
        import mlflow

        _call(
            lambda: mlflow.log_artifact(str(path), artifact_path=folder),
            lambda: {"kind": "artifact", "file": _keep_file(path), "folder": folder},
        )

    def log_model(self, model, example_input, checkpoint: Path) -> None:
        _call(
            lambda: flavour.log_model(model, example_input, checkpoint),
            lambda: {"kind": "model", "checkpoint": _keep_file(checkpoint)},
        )

    def last_step(self, metric: str) -> int:
        import mlflow

        run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
        history = mlflow.MlflowClient().get_metric_history(run_id, metric)
        return max((m.step for m in history), default=0)


MLFLOW = MlflowTracker()
_tracker: Tracker = MLFLOW  # a journaled run's, while one is open (_journaled)


# --- what the stages call -------------------------------------------------------------------------


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    metrics = {k: float(v) for k, v in metrics.items()}
    _tracker.log_metrics(metrics, step, int(time.time() * 1000))


def last_step(metric: str) -> int:
    """The highest step of `metric` that the open run has logged (0 for none)."""
    return _tracker.last_step(metric)


def log_artifact(path: Path, folder: str | None = None) -> None:
    _tracker.log_artifact(path, folder)


def log_model(model, example_input, checkpoint: Path) -> None:
    """The trained network, loadable by mlflow.pytorch.load_model. MLflow 3 saves it in the
    'pt2' format (a torch.export graph, no pickled code), traced on the example input.
    `checkpoint` (the stage's state dict file, models/model.pt) goes with it as
    extra_files/model.pt: model.pretrained = runs:/<id>/model starts a new run from it. It also
    rebuilds the model if the call has to be replayed (and from a journaled run)."""
    _tracker.log_model(model, example_input, checkpoint)


def set_tags(tags: dict[str, Any]) -> None:
    _tracker.set_tags({k: str(v) for k, v in tags.items()})
