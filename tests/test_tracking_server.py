"""A real MLflow tracking server on loopback: unreachable at start, killed mid-run, replayed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import EPOCHS, REPO, finish, run_stage, start_train, wait_for_checkpoint
from mlflow.tracking import MlflowClient

from stages.errors import StageError
from stages.tracking import store

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` with a SQLite store, on one loopback port across restarts."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": str(MLFLOW.parent), "MLFLOW_DISABLE_TELEMETRY": "true"},
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def kill(self) -> None:
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its worker processes
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    yield server
    if server.proc and server.proc.poll() is None:
        server.kill()


def test_an_unreachable_server_fails_fast_naming_the_uri(prepared):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.time()
    with pytest.raises(StageError, match=f"MLflow tracking server {uri} is unreachable"):
        store.check_reachable(uri)
    assert time.time() - start < 10

    # Each stage that logs checks the server first, before any work: within 10 s of its start,
    # start-up (importing torch and mlflow) included.
    for stage, output in [("train", "models/model.pt"), ("evaluate", "metrics/eval.json")]:
        start = time.time()
        result = run_stage(stage, prepared, env={"MLFLOW_TRACKING_URI": uri})
        assert time.time() - start < 10, f"{stage} took {time.time() - start:.1f} s to fail"
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"error ({stage}): MLflow tracking server {uri} is unreachable (ConnectionError): start "
            "it, or unset MLFLOW_TRACKING_URI and mlflow.tracking_uri to log to mlflow.db"
        ]
        assert not (prepared / output).exists()


def test_a_server_dying_mid_run_loses_nothing(prepared, server):
    server.start()
    proc = start_train(prepared, env={"MLFLOW_TRACKING_URI": server.uri})
    wait_for_checkpoint(prepared, 3, proc)
    server.kill()
    result = finish(proc)

    assert result.returncode == 0, result.stderr
    assert "warning: MLflow logging failed" in result.stderr
    assert "python -m stages.tracking.replay" in result.stderr
    metrics = json.loads((prepared / "metrics/train.json").read_text())
    assert metrics["epochs_run"] == EPOCHS and (prepared / "models/model.pt").exists()
    run_id = json.loads((prepared / "models/run.json").read_text())["run_id"]
    journal = prepared / "data/mlflow-missed" / run_id / "journal.json"
    assert journal.exists()

    server.start()  # back, with the same store
    replayed = subprocess.run(
        [sys.executable, "-m", "stages.tracking.replay"],
        cwd=prepared,
        env={"PATH": str(MLFLOW.parent), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replayed.returncode == 0, replayed.stderr
    assert not journal.exists()
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    assert steps == set(range(1, EPOCHS + 1))
    assert {"train.json", "params.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
    # The model, logged by the replay (MLflow 3 keeps it as a logged model of the run).
    (model,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert "MLmodel" in files and "extra_files" in files
