"""The repository runs out of the box: the bundled real CIFAR-10 is the default source, and the
pipeline runs on it from a copy of what git tracks without a single network connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, copy_repo

from stages import params as P
from stages.io import sha256_of

BIN = Path(sys.executable).parent  # the venv's dvc and python

# Loaded by every Python process started with this folder first on PYTHONPATH — DVC, each stage,
# MLflow's helpers — it refuses any connection that leaves the machine and records the attempt.
NO_NETWORK = """
import os, socket

_connect = socket.socket.connect


def _guarded(self, address):
    local = self.family == socket.AF_UNIX or (
        isinstance(address, tuple) and str(address[0]) in ("127.0.0.1", "::1", "localhost")
    )
    if not local:
        with open(os.environ["NETWORK_LOG"], "a") as log:
            log.write(f"{os.getpid()} connect {address!r}\\n")
        raise OSError(101, "network is unreachable (test: no network)")
    return _connect(self, address)


def _no_lookup(host, *args, **kwargs):
    if host not in ("127.0.0.1", "::1", "localhost", None):
        with open(os.environ["NETWORK_LOG"], "a") as log:
            log.write(f"{os.getpid()} getaddrinfo {host!r}\\n")
        raise socket.gaierror(-2, "Name or service not known (test: no network)")
    return _getaddrinfo(host, *args, **kwargs)


_getaddrinfo = socket.getaddrinfo
socket.socket.connect = _guarded
socket.getaddrinfo = _no_lookup
"""


def test_the_bundled_archive_is_the_one_committed_and_pinned():
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", P.BUNDLED], cwd=REPO, capture_output=True
    )
    assert tracked.returncode == 0, f"{P.BUNDLED} is not tracked by git"
    assert sha256_of(REPO / P.BUNDLED) == P.BUNDLED_SHA256


def test_the_pipeline_runs_on_the_bundled_data_from_a_clone_without_network(tmp_path):
    repo = copy_repo(tmp_path / "clone")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert (params["data"]["source"], params["data"]["sha256"]) == (P.BUNDLED, P.BUNDLED_SHA256)
    params["train"]["epochs"] = 1  # the data and every other param as shipped
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"],
        cwd=repo,
        check=True,
    )
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    log = tmp_path / "network.log"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(guard),
        "NETWORK_LOG": str(log),
    }
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)

    result = subprocess.run(
        ["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((repo / "data/raw/meta.json").read_text())
    assert meta["sha256"] == P.BUNDLED_SHA256
    assert (meta["train_count"], meta["test_count"], len(meta["classes"])) == (50000, 10000, 10)
    assert json.loads((repo / "metrics/eval.json").read_text())["test_accuracy"] > 0.1
    # The guard was in place (the stages ran Python with it) and nothing tried to leave.
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 80), 1)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert "test: no network" in probe.stderr
    attempts = [line for line in log.read_text().splitlines() if "192.0.2.1" not in line]
    assert attempts == [], attempts

    summary = subprocess.run(
        [sys.executable, "-m", "stages.tracking.summary"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert summary.returncode == 0, summary.stderr
    run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    lines = summary.stdout.splitlines()
    assert lines[0].startswith("results:    metrics/eval.json: test accuracy ")
    assert f"(id {run_id}) in experiment 'overfitting'" in lines[1]
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000" in lines[2]
    assert f"/runs/{run_id}" in lines[2]
