"""Where the MLflow store is, whether its tracking server answers, and its experiments.

The store is, in this order: $MLFLOW_TRACKING_URI, `mlflow.tracking_uri` in params.yaml, or
`mlflow.db` at the repository root (MLflow's own default location, so `mlflow ui` started there
shows the runs), with artifacts beside it in `mlruns/`. A tracking server must answer when a stage
starts: else a one-line error within seconds, before any data is loaded. A URI
`journal:<folder>` is no MLflow store: the runs are written to a journal there, for a machine
without MLflow (stages/tracking/journal.py), and replayed into a store later.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages import params as P
from stages.errors import StageError
from stages.runtime import repo_root


def tracking_uri(mlflow_params: P.Mlflow) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or mlflow_params.tracking_uri
        or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )


def check_reachable(uri: str) -> None:
    """A tracking server must answer /health within 5 seconds, and accept our credentials."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        raise StageError(
            f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}): "
            "start it, or unset MLFLOW_TRACKING_URI and mlflow.tracking_uri to log "
            "to mlflow.db"
        ) from None
    # A server with authentication (make mlflow-server SERVER_ARGS=--auth) answers /health to
    # anyone: ask the API itself, with the credentials MLflow's client will send.
    user, password = (
        os.environ.get("MLFLOW_TRACKING_USERNAME"),
        os.environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    answer = requests.get(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        timeout=10,
        auth=(user, password) if user and password else None,
    )
    if answer.status_code in (401, 403):
        raise StageError(
            f"MLflow tracking server {uri} refused the request (HTTP {answer.status_code}): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of it"
        )


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize the first contact with a SQLite store across processes: MLflow creates its
    tables on first use, and two workers doing that at once fail ('table ... already exists')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///") :] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_id(name: str, uri: str) -> str:
    """Get or create the experiment; safe when several workers create it at the same time."""
    with _store_lock(uri):
        return _get_or_create_experiment(name, uri)


def _get_or_create_experiment(name: str, uri: str) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

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
