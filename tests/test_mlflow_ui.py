"""The MLflow UI, as the README starts it, in a real (headless) browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_tracking_server import free_port

from stages import params as P
from stages.tracking import runs

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI needs Debian's chromium for this test: .ci/run installs it")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")


def page_text(url: str, profile: Path) -> str:
    """The page's visible text after its JavaScript ran, as headless Chromium renders it."""
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",
            "--window-size=1600,1000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    dom = re.sub(r"<style[^>]*>.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture
def ui(workdir):
    """Two runs logged by the pipeline's tracking code, and `mlflow ui` on loopback."""
    ids = []
    for lr, accuracy in [(0.01, 0.4321), (0.05, 0.5432)]:
        os.environ["DVC_EXP_NAME"] = f"ui-lr-{lr}"
        try:
            with runs.start_run(P.parse({"train": {"lr": lr}}), None) as run:
                runs.log_metrics({"test_accuracy": accuracy})
                ids.append(run.info.run_id)
        finally:
            del os.environ["DVC_EXP_NAME"]
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            "--backend-store-uri",
            "sqlite:///mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            assert time.time() < deadline, "mlflow ui did not start"
            time.sleep(0.5)
    yield base, ids
    os.killpg(server.pid, 9)
    server.wait()


def test_the_ui_lists_the_runs_with_their_params_and_metrics(ui, tmp_path):
    base, ids = ui
    runs_page = page_text(f"{base}/#/experiments/1/runs", tmp_path / "profile")
    assert "overfitting" in runs_page
    assert "ui-lr-0.01" in runs_page and "ui-lr-0.05" in runs_page

    compare = page_text(
        f'{base}/#/compare-runs?runs={json.dumps(ids)}&experiments=["1"]', tmp_path / "profile"
    )
    assert "Comparing 2 Runs" in compare
    assert "train.lr" in compare and "0.01000" in compare and "0.05000" in compare
    assert "test_accuracy" in compare and "0.43210" in compare and "0.54320" in compare
