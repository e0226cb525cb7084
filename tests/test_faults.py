"""Interruptions for real: killed processes, SIGTERM, an interrupted write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import EPOCHS, TINY, finish, start_train, wait_for_checkpoint, write_params
from stages import io as sio

def runs(cwd):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("overfitting")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_sigkill_then_rerun_resumes_bit_identically(prepared):
    reference = finish(start_train(prepared))
    assert reference.returncode == 0, reference.stderr
    expected = {p: (prepared / p).read_bytes() for p in ("models/model.pt", "metrics/train.json")}
    assert not list((prepared / "data/checkpoints").glob("*.pt"))  # removed once finished

    proc = start_train(prepared)
    wait_for_checkpoint(prepared, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (prepared / "models/model.pt").unlink()  # as DVC does before rerunning the stage

    resumed = finish(start_train(prepared))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    for path, data in expected.items():
        assert (prepared / path).read_bytes() == data, path

    client, (first, second) = runs(prepared)
    assert second.info.run_id == json.loads((prepared / "models/run.json").read_text())["run_id"]
    assert client.get_run(second.info.run_id).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(second.info.run_id, "val_accuracy")}
    assert steps == set(range(1, EPOCHS + 1))  # one run holds the whole history


def test_sigterm_marks_the_run_killed_and_leaves_a_checkpoint(prepared):
    proc = start_train(prepared)
    checkpoint = wait_for_checkpoint(prepared, 2, proc)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == "error (train): interrupted; run again to resume"
    client, (run,) = runs(prepared)
    assert run.info.status == "KILLED"
    assert checkpoint.exists()

    # Other params: the checkpoint is not theirs, training starts from scratch in a new run.
    write_params(prepared, **{**TINY, "data.source": "unused", "train.epochs": 3, "seed": 5})
    other = finish(start_train(prepared))
    assert other.returncode == 0 and "resuming" not in other.stdout
    assert checkpoint.exists()  # still there for its own params
    assert len(runs(prepared)[1]) == 2


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    sio.write_json(target, {"old": 1})

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        sio.write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_checkpoints_load_only_weights(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        sio.load_torch(path)
