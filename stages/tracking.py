"""Everything MLflow sees is logged here: where the store is, the run, its tags.

One pipeline run = one MLflow run: train opens it and writes its id to models/run.json, and
evaluate logs into the same run. The store is, in this order: $MLFLOW_TRACKING_URI,
`mlflow.tracking_uri` in params.yaml, or `mlflow.db` at the repository root (MLflow's own default
location, so `mlflow ui` started there shows the runs), with artifacts beside it in `mlruns/`.
The repository root is $DVC_ROOT when DVC sets it: a queued `dvc exp run` works in a temporary
copy under .dvc/tmp/exps, and a store there would be deleted with it.

A tracking server must answer when a stage starts (else a one-line error within seconds). If it
stops answering mid-run, training goes on: from the first failed call on, every logging call is
written to a journal, data/mlflow-missed/<run id>/journal.json under the repository root, which
is sent once more when the stage ends and can be replayed later with
`python -m stages.tracking replay`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# No network access but the data download: MLflow 3 would otherwise send usage telemetry.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A dead server should cost seconds, not MLflow's default of minutes of retries per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from stages import io as sio, params as P
from stages.errors import StageError, uninterrupted

MISSED = Path("data/mlflow-missed")  # under the repository root


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(mlflow_params: P.Mlflow) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or mlflow_params.tracking_uri
            or f"sqlite:///{repo_root() / 'mlflow.db'}")


def check_reachable(uri: str) -> None:
    """A tracking server must answer /health within 5 seconds, and accept our credentials."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        raise StageError(f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}): "
                         "start it, or unset MLFLOW_TRACKING_URI and mlflow.tracking_uri to log "
                         "to mlflow.db") from None
    # A server with authentication (make mlflow-server SERVER_ARGS=--auth) answers /health to
    # anyone: ask the API itself, with the credentials MLflow's client will send.
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    answer = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                          params={"max_results": 1}, timeout=10,
                          auth=(user, password) if user and password else None)
    if answer.status_code in (401, 403):
        raise StageError(f"MLflow tracking server {uri} refused the request (HTTP {answer.status_code}): "
                         "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of it")


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize the first contact with a SQLite store across processes: MLflow creates its
    tables on first use, and two workers doing that at once fail ('table ... already exists')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _experiment_id(name: str, uri: str) -> str:
    """Get or create the experiment; safe when several workers create it at the same time."""
    with _store_lock(uri):
        return _get_or_create_experiment(name, uri)


def _get_or_create_experiment(name: str, uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = (repo_root() / "mlruns").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:
        experiment = client.get_experiment_by_name(name)  # another worker won the race
        if experiment is None:
            raise
        return experiment.experiment_id


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
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
def start_run(params: P.Params, data_sha256: str | None,
              resume_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the pipeline run, with every param flattened under its params.yaml name; or reopen
    `resume_id`, the run of an interrupted training that is being resumed."""
    uri = tracking_uri(params.mlflow)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if resume_id:
        with uninterrupted():
            run = mlflow.start_run(run_id=resume_id)
        with _ended_by_outcome(run):
            yield run
        return
    tags = run_tags(params)
    if data_sha256:
        tags["data.sha256"] = data_sha256
    with uninterrupted():
        experiment_id = _experiment_id(params.mlflow.experiment, uri)
        run = mlflow.start_run(experiment_id=experiment_id,
                               run_name=os.environ.get("DVC_EXP_NAME"), tags=tags)
    with _ended_by_outcome(run):
        with uninterrupted():
            mlflow.log_params(P.flatten(params))
        yield run


@contextmanager
def resume_run(run_id: str, mlflow_params: P.Mlflow) -> Iterator[mlflow.ActiveRun]:
    uri = tracking_uri(mlflow_params)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with uninterrupted():
        run = mlflow.start_run(run_id=run_id)
    with _ended_by_outcome(run):
        yield run


@contextmanager
def _ended_by_outcome(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any other error); then send
    whatever a dead server missed once more, or say where it is kept."""
    global _journal
    _journal = None
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _call(lambda: mlflow.end_run(status), lambda: {"kind": "end", "status": status}, run.info.run_id)
        if _journal is not None:
            _flush_journal()


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
        except Exception as exc:  # noqa: BLE001 - any failure of the server or the network
            run_id = run_id or mlflow.active_run().info.run_id  # type: ignore[union-attr]
            print(f"warning: MLflow logging failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"training goes on, and the logging is kept in {MISSED}/{run_id}/",
                  file=sys.stderr, flush=True)
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
        print(f"MLflow: the missed logging of run {_journal['run_id']} was sent after all",  # type: ignore[index]
              file=sys.stderr)
    except Exception:  # noqa: BLE001
        print(f"warning: MLflow run {_journal['run_id']} is incomplete: "  # type: ignore[index]
              f"{len(_journal['calls'])} logging calls are kept in {folder}; "  # type: ignore[index]
              "when the server is back: python -m stages.tracking replay", file=sys.stderr)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    metrics = {k: float(v) for k, v in metrics.items()}
    timestamp = int(time.time() * 1000)
    _call(lambda: mlflow.log_metrics(metrics, step=step, timestamp=timestamp),
          lambda: {"kind": "metrics", "metrics": metrics, "step": step, "timestamp": timestamp})


def log_artifact(path: Path, folder: str | None = None) -> None:
    _call(lambda: mlflow.log_artifact(str(path), artifact_path=folder),
          lambda: {"kind": "artifact", "file": _keep_file(path), "folder": folder})


def log_model(model, example_input, checkpoint: Path) -> None:
    """The trained network, loadable by mlflow.pytorch.load_model. MLflow 3 saves it in the
    'pt2' format (a torch.export graph, no pickled code), traced on the example input.
    `checkpoint` (the stage's state dict file, models/model.pt) goes with it as
    extra_files/model.pt: model.pretrained = runs:/<id>/model starts a new run from it. It also
    rebuilds the model if the call has to be replayed."""
    _call(lambda: _log_model(model, example_input, checkpoint),
          lambda: {"kind": "model", "checkpoint": _keep_file(checkpoint)})


def _log_model(model, example_input, checkpoint: Path) -> None:
    import mlflow.pytorch
    import torch

    from mlflow.models import infer_signature

    with torch.no_grad():  # the signature: float32 images (N×3×H×W, pixels in [0, 1]) → class logits
        device = next(model.parameters()).device
        signature = infer_signature(example_input.numpy(),
                                    model(example_input.to(device)).float().cpu().numpy())
    mlflow.pytorch.log_model(model, name="model", signature=signature,
                             input_example=example_input.numpy(), extra_files=[str(checkpoint)],
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def set_tags(tags: dict[str, Any]) -> None:
    tags = {k: str(v) for k, v in tags.items()}
    _call(lambda: mlflow.set_tags(tags), lambda: {"kind": "tags", "tags": tags})


def replay(folder: Path) -> None:
    """Send a journal's calls to its run, in order; remove the journal when all went through."""
    from mlflow.entities import Metric

    journal = sio.read_json(Path(folder) / "journal.json")
    uri, run_id = journal["tracking_uri"], journal["run_id"]
    check_reachable(uri)
    client = MlflowClient(uri)
    for call in journal["calls"]:
        if call["kind"] == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, call["timestamp"], call["step"] or 0)
                                              for k, v in call["metrics"].items()])
        elif call["kind"] == "tags":
            for key, value in call["tags"].items():
                client.set_tag(run_id, key, value)
        elif call["kind"] == "artifact":
            client.log_artifact(run_id, call["file"], call["folder"])
        elif call["kind"] == "model":
            _replay_model(uri, run_id, Path(call["checkpoint"]))
        elif call["kind"] == "end":
            client.set_terminated(run_id, call["status"])
    shutil.rmtree(folder)


def _replay_model(uri: str, run_id: str, checkpoint: Path) -> None:
    import mlflow.pytorch
    import torch

    from stages import models

    saved = sio.load_torch(checkpoint)
    params = P.parse(saved["params"])
    model = models.build(params, len(saved["classes"]), params.data.image_size)
    model.load_state_dict(saved["state_dict"])
    example = torch.rand(2, 3, params.data.image_size, params.data.image_size)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        _log_model(model.eval(), example, checkpoint)


def main() -> None:
    """python -m stages.tracking replay: send every journal under data/mlflow-missed/."""
    if sys.argv[1:] != ["replay"]:
        sys.exit("usage: python -m stages.tracking replay")
    folders = sorted((repo_root() / MISSED).glob("*/journal.json"))
    for journal in folders:
        try:
            replay(journal.parent)
            print(f"replayed {journal.parent.name}")
        except StageError as exc:
            sys.exit(f"error (tracking): {exc}")
    if not folders:
        print(f"nothing to replay in {repo_root() / MISSED}")


if __name__ == "__main__":
    main()
