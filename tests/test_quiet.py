"""Quiet by default: an offline pipeline run prints each stage's own progress and result, and
nothing of MLflow's: no artifact download/upload progress bars, no database set-up notes."""

from __future__ import annotations

import re

import pytest
from conftest import run_stage

OWN = {
    "check": [],
    "download": [r"download: \d+ train \+ \d+ test images"],
    "augment": [r"augment: \d+ training images", r"warning \(augment\): the validation split"],
    "train": [r"epoch +\d+  train loss"],
    "evaluate": [r"evaluate: test accuracy"],
}
CHATTER = re.compile(r"artifacts|database|alembic|INFO|it/s|%\|", re.IGNORECASE)


@pytest.mark.fresh_store  # MLflow's notes as it makes the store's tables: not printed either
def test_a_pipeline_run_prints_only_the_stages_own_lines(workdir):
    for stage, patterns in OWN.items():
        result = run_stage(stage, workdir)
        assert result.returncode == 0, result.stderr
        lines = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
        chatter = [line for line in lines if CHATTER.search(line)]
        assert not chatter, f"{stage} printed MLflow's chatter: {chatter[:3]}"
        foreign = [line for line in lines if line and not any(re.match(p, line) for p in patterns)]
        assert not foreign, f"{stage} printed more than its progress and result: {foreign[:3]}"
        assert (workdir / "mlflow.db").exists() or stage in ("check", "download", "augment")
