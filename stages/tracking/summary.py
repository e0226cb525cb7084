"""Where the last pipeline run's results are: what `make run` prints when `dvc repro` is done.

    python -m stages.tracking.summary

Prints the test accuracy and verdict from metrics/eval.json, the MLflow run (name, id,
experiment) that models/run.json names, and the one command that opens the MLflow UI on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import errors, params as P
from stages.errors import StageError
from stages.runtime import repo_root
from stages.tracking import journal
from stages.tracking.store import tracking_uri

EVAL = Path("metrics/eval.json")
RUN = Path("models/run.json")
PORT = 5000


def main() -> None:
    for path in (EVAL, RUN):
        if not path.is_file():
            raise StageError(f"{path} not found: run the pipeline first (make run, or dvc repro)")
    metrics = json.loads(EVAL.read_text())
    run_id = json.loads(RUN.read_text())["run_id"]
    uri = tracking_uri(P.load().mlflow)
    if journal.is_journal(uri):  # a machine without MLflow
        print(f"results:    {EVAL}: test accuracy {metrics['test_accuracy']:.1%}")
        print(
            f"journal:    {journal.folder_of(uri) / run_id}; into MLflow with: "
            f"python -m stages.tracking.replay {journal.folder_of(uri)}"
        )
        return

    from mlflow.tracking import MlflowClient  # only here: the results above need no MLflow

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    page = f"#/experiments/{experiment.experiment_id}/runs/{run_id}"

    print(
        f"results:    {EVAL}: test accuracy {metrics['test_accuracy']:.1%}, "
        f"gap (train − test) {100 * metrics['generalization_gap']:+.1f} pt, "
        f"verdict {metrics['verdict']}"
    )
    print(
        f"MLflow run: {run.info.run_name} (id {run_id}) in experiment '{experiment.name}', "
        f"store {uri}"
    )
    print(ui_command(uri, page))


def ui_command(uri: str, page: str) -> str:
    """The MLflow UI for this store: a server's own address, or `mlflow ui` on a local store."""
    if uri.startswith(("http://", "https://")):
        return f"open:       {uri.rstrip('/')}/{page}"
    default = f"sqlite:///{repo_root() / 'mlflow.db'}"
    store = "sqlite:///mlflow.db" if uri == default else uri
    return (
        f"open it:    .venv/bin/mlflow ui --backend-store-uri {store} --port {PORT}   "
        f"then http://127.0.0.1:{PORT}/{page}"
    )


if __name__ == "__main__":
    errors.run(main)
