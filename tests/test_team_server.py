"""The team tracking server (stages/tracking/server.py): MLflow on PostgreSQL, on loopback, with basic auth.

Integration tests: they start a real PostgreSQL (Debian's postgresql package) and a real
`mlflow server`. Without PostgreSQL they are skipped, unless REQUIRE_POSTGRES=1 (as .ci/run sets
it), which makes its absence a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
from conftest import REPO, TINY, run_stage, write_params
from mlflow.tracking import MlflowClient
from test_tracking_server import free_port

from stages import augment, download
from stages.errors import StageError
from stages.tracking import server as team_server

pytestmark = pytest.mark.integration

try:
    team_server.pg_bin("initdb")
    HAVE_POSTGRES = True
except StageError:
    HAVE_POSTGRES = False
if not HAVE_POSTGRES:
    if os.environ.get("REQUIRE_POSTGRES") == "1":
        raise RuntimeError(
            "REQUIRE_POSTGRES=1 but PostgreSQL is not installed (apt-get install postgresql)"
        )
    pytest.skip("PostgreSQL is not installed", allow_module_level=True)

PASSWORD = "team-Passw0rd-for-tests"


class TeamServer:
    """`python -m stages.tracking.server` in a folder that the postgres user can reach (under /tmp)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="team-server-", dir="/tmp"))
        self.folder.chmod(0o755)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.tracking.server",
                "--data",
                str(self.folder),
                "--port",
                str(self.port),
                "--workers",
                "2",
                *args,
            ],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("the team server did not start")

    def psql(self, database: str, query: str) -> str:
        return team_server.postgres(
            "psql",
            "-h",
            str(self.folder / "postgres"),
            "-U",
            team_server.ROLE,
            "-d",
            database,
            "-Atc",
            query,
        ).strip()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # Ctrl-C's path: the server, then PostgreSQL
        self.proc.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def team_server_open():
    server = TeamServer()
    yield server
    server.stop()


def prepared_copy(source: Path, dest: Path, **overrides) -> Path:
    dest.mkdir()
    shutil.copytree(source / "data", dest / "data")
    write_params(dest, **overrides)
    return dest


def test_pipeline_and_parallel_experiments_log_to_postgres(
    workdir, pickle_archive, team_server_open
):
    server = team_server_open
    base = {**TINY, "data.source": str(pickle_archive)}
    download.main()
    augment.main()
    env = {"MLFLOW_TRACKING_URI": server.uri}
    for stage in ("train", "evaluate"):
        result = run_stage(stage, workdir, env=env)
        assert result.returncode == 0, result.stderr[-2000:]

    client = MlflowClient(server.uri)
    run_id = json.loads((workdir / "models/run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {
        "params.yaml",
        "train.json",
        "eval.json",
    }
    # The runs are rows of PostgreSQL's tables, not of a file beside the server.
    assert (
        server.psql("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == "FINISHED"
    )

    # Several experiments at once, each a train + evaluate of its own: nothing lost.
    lrs = [0.001, 0.01, 0.05]
    procs = []
    for i, lr in enumerate(lrs):
        folder = prepared_copy(
            workdir, workdir.parent / f"parallel-{i}", **{**base, "train.lr": lr}
        )
        env_i = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": server.uri,
            "DVC_EXP_NAME": f"parallel-{i}",
        }
        procs.append(
            subprocess.Popen(
                f"{sys.executable} -m stages.train && {sys.executable} -m stages.evaluate",
                shell=True,
                cwd=folder,
                env=env_i,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    experiment = client.get_experiment_by_name("overfitting")
    runs = {
        r.data.tags.get("dvc.exp_name"): r for r in client.search_runs([experiment.experiment_id])
    }
    for i, lr in enumerate(lrs):
        r = runs[f"parallel-{i}"]
        assert r.info.status == "FINISHED" and r.data.params["train.lr"] == str(lr)
        assert len(client.get_metric_history(r.info.run_id, "val_accuracy")) == TINY["train.epochs"]
        assert "test_accuracy" in r.data.metrics
        models = client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'"
        )
        assert [m.name for m in models] == ["model"]
        files = {f.path for f in client.list_logged_model_artifacts(models[0].model_id)}
        assert (
            "extra_files" in files and "MLmodel" in files
        )  # the artifacts went through the server
    assert server.psql("mlflow", "SELECT count(*) FROM runs") == "4"


def get(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user:
        request.add_header(
            "Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode()
        )
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_an_auth_enabled_server_refuses_unauthenticated_requests(prepared):
    server = TeamServer("--auth", env={"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD})
    try:
        api = server.uri + "/api/2.0/mlflow/experiments/search?max_results=10"
        assert get(api) == 401
        assert get(api, "admin", "wrong-password") == 401
        assert get(api, "admin", PASSWORD) == 200
        # The pipeline, given the credentials the MLflow client reads, logs as usual.
        env = {
            "MLFLOW_TRACKING_URI": server.uri,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        }
        write_params(prepared, **{**TINY, "data.source": "unused", "train.epochs": 1})
        result = run_stage("train", prepared, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        # ... and without them it is stopped with MLflow's refusal, before any training
        no_password = run_stage("train", prepared, env={"MLFLOW_TRACKING_URI": server.uri})
        assert no_password.returncode == 1
        assert no_password.stderr.strip().splitlines() == [
            f"error (train): MLflow tracking server {server.uri} refused the request (HTTP 401): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of it"
        ]
        # the users live in PostgreSQL too
        assert server.psql("mlflow_auth", "SELECT username FROM users") == "admin"
    finally:
        server.stop()


def test_exposing_an_open_server_or_a_default_password_is_refused(tmp_path):
    def start(*args, env=None):
        return subprocess.run(
            [sys.executable, "-m", "stages.tracking.server", "--data", str(tmp_path / "s"), *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )

    open_to_all = start("--host", "0.0.0.0")
    assert open_to_all.returncode == 1
    assert open_to_all.stderr.strip().startswith(
        "error (server): --host 0.0.0.0 would expose a server"
    )
    no_password = start("--auth", env={"MLFLOW_AUTH_ADMIN_PASSWORD": ""})
    assert no_password.returncode == 1
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in no_password.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s" / "postgres").exists()  # nothing was started
    assert team_server.is_loopback("127.0.0.1") and team_server.is_loopback("::1")
    assert not team_server.is_loopback("0.0.0.0") and not team_server.is_loopback("10.0.0.5")
