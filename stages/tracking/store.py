"""Where the MLflow store is, and whether its tracking server answers.

The store is, in this order: $MLFLOW_TRACKING_URI, `mlflow.tracking_uri` in params.yaml, or
`mlflow.db` at the repository root (MLflow's own default location, so `mlflow ui` started there
shows the runs), with artifacts beside it in `mlruns/`. A tracking server must answer when a stage
starts: else a one-line error within seconds, before any data is loaded.
"""

from __future__ import annotations

import os

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
