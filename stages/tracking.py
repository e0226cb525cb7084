"""Everything MLflow sees is logged here: where the store is, the run, its tags.

One pipeline run = one MLflow run: train opens it and writes its id to models/run.json, and
evaluate logs into the same run. The store is, in this order: $MLFLOW_TRACKING_URI,
`mlflow.tracking_uri` in params.yaml, or `mlflow.db` at the repository root (MLflow's own default
location, so `mlflow ui` started there shows the runs), with artifacts beside it in `mlruns/`.
The repository root is $DVC_ROOT when DVC sets it: a queued `dvc exp run` works in a temporary
copy under .dvc/tmp/exps, and a store there would be deleted with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# No network access but the data download: MLflow 3 would otherwise send usage telemetry.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from stages import params as P


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(mlflow_params: P.Mlflow) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or mlflow_params.tracking_uri
            or f"sqlite:///{repo_root() / 'mlflow.db'}")


def _experiment_id(name: str, uri: str) -> str:
    """Get or create the experiment; safe when several workers create it at the same time."""
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
    for env, tag in [("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")]:
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@contextmanager
def start_run(params: P.Params, data_sha256: str | None,
              resume_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the pipeline run, with every param flattened under its params.yaml name; or reopen
    `resume_id`, the run of an interrupted training that is being resumed."""
    uri = tracking_uri(params.mlflow)
    mlflow.set_tracking_uri(uri)
    if resume_id:
        with _ended_by_outcome(mlflow.start_run(run_id=resume_id)) as run:
            yield run
        return
    experiment_id = _experiment_id(params.mlflow.experiment, uri)
    tags = run_tags(params)
    if data_sha256:
        tags["data.sha256"] = data_sha256
    run = mlflow.start_run(experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME"),
                           tags=tags)
    with _ended_by_outcome(run):
        mlflow.log_params(P.flatten(params))
        yield run


@contextmanager
def resume_run(run_id: str, mlflow_params: P.Mlflow) -> Iterator[mlflow.ActiveRun]:
    mlflow.set_tracking_uri(tracking_uri(mlflow_params))
    with _ended_by_outcome(mlflow.start_run(run_id=run_id)) as run:
        yield run


@contextmanager
def _ended_by_outcome(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any other error)."""
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: Path, folder: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=folder)


def log_model(model, example_input) -> None:
    """The trained network with a signature, loadable by mlflow.pytorch.load_model.

    MLflow 3 saves it in the 'pt2' format (a torch.export graph, no pickled code), traced on the
    example input.
    """
    import mlflow.pytorch
    import torch

    mlflow.pytorch.log_model(model, name="model", input_example=example_input.numpy(),
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})
