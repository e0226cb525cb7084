"""An experiment that DVC restored instead of running, recorded as an MLflow run of its own name.

DVC's run cache restores a stage whose code, deps and params ran before (docs/pipeline.md): an
experiment whose params match an earlier one's (the same grid under another prefix, a machine
that ran the point in an earlier pass, a search drawing a point it tried) gets that run's model
and metrics in seconds, and its stages log nothing. So that every experiment is still one MLflow
run, which the reports and the MLflow UI find by name, `record` makes one: the experiment's own
params, every metric (each epoch's) of the run that made the restored outputs, and that run's id
in the tag `restored_from`. The model and plots stay with that run.
"""

from __future__ import annotations

import json
import subprocess

import yaml

from stages import params as P


def experiment_commit(name: str) -> str | None:
    """The commit of the newest DVC experiment named `name` (its git ref, refs/exps/…/<name>)."""
    refs = subprocess.run(
        [
            "git",
            "for-each-ref",
            "--sort=-committerdate",
            "--format=%(objectname) %(refname)",
            "refs/exps",
        ],
        capture_output=True,
        text=True,
    ).stdout
    for line in refs.splitlines():
        sha, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    return None


def source_run_id(commit: str) -> str | None:
    """The MLflow run that made the experiment's model: models/run.json, read from DVC's cache."""
    import dvc.api

    try:
        return json.loads(dvc.api.read("models/run.json", rev=commit))["run_id"]
    except Exception:  # no such out at that commit, or not in this machine's cache
        return None


def own_params(commit: str) -> dict:
    """The experiment's params, flattened as the train stage logs them."""
    text = subprocess.run(
        ["git", "show", f"{commit}:params.yaml"], capture_output=True, text=True, check=True
    ).stdout
    return P.flatten(P.parse(yaml.safe_load(text)))


def record(client, experiment_id: str, name: str):
    """The MLflow run of experiment `name`, made from the run DVC restored its outputs from;
    None when `name` is not a restored experiment, or its source run is not in this store."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    commit = experiment_commit(name)
    source_id = source_run_id(commit) if commit else None
    if source_id is None:
        return None
    try:
        source = client.get_run(source_id)
    except MlflowException:
        return None
    kept = {k: v for k, v in source.data.tags.items() if not k.startswith(("mlflow.", "dvc."))}
    tags = {
        **kept,
        "dvc.exp_name": name,
        "git.commit": commit,  # the experiment's commit: its params.yaml
        "mlflow.source.git.commit": commit,
        "restored_from": source_id,
        "mlflow.note.content": (
            f"DVC restored this experiment's outputs from its run cache: run "
            f"{source.info.run_name} ({source_id}) had the same params and data. Its metrics "
            "are copied here; the model and plots are in that run."
        ),
    }
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, str(v)) for k, v in own_params(commit).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=params[i : i + 100])
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in source.data.metrics
        for m in client.get_metric_history(source_id, key)
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.set_terminated(run_id)
    return client.get_run(run_id)
