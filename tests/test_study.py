"""The study grids (YAML files) and the study's queue handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from stages.errors import ParamsError
from stages.experiments import dvcqueue, study

STATUS = """Task     Name                            Created    Status
0199407  study-wider-model-s0            02:37 AM   Success
c62c203  study-wider-model-s2            02:37 AM   Running
4fb4e8a  study-dropout-s0                02:37 AM   Queued
d9b05b9  study-l1-s0                     02:37 AM   Failed

Worker status: 1 active, 0 idle
"""


def test_pending_counts_queued_and_running_tasks():
    assert dvcqueue.pending(STATUS) == 2
    assert (
        dvcqueue.pending("Task     Name    Created    Status\n\nWorker status: 0 active, 0 idle\n")
        == 0
    )
    assert dvcqueue.tasks(STATUS)["d9b05b9"] == ("study-l1-s0", "Failed")


def test_every_row_of_every_grid_is_valid_params():
    assert study.grid_names() == ["finetune", "multitask", "regularization"]
    regularization = study.load_grid("regularization")
    assert len(regularization.rows) == 16 and regularization.seeds == (0, 1, 2)
    for row in regularization.rows:
        values = study.overrides(regularization, row, 1, "data.tar.gz")
        assert values["seed"] == 1 and values["data.train_size"] in (5000, None)
    assert study.overrides(regularization, "crop-flip", 0) == {
        "data.train_size": 5000,
        "train.epochs": 60,
        "train.lr": 0.01,
        "augment.online": True,
        "augment.flip": True,
        "augment.crop_padding": 4,
        "seed": 0,
    }  # the shared block, merged
    finetune = study.load_grid("finetune")
    for row in finetune.rows:
        values = study.overrides(finetune, row, 0)
        assert values["model.name"] == "efficientnet_lite0" and values["data.train_size"] in (
            1000,
            5000,
        )
    multitask = study.load_grid("multitask")
    for row in multitask.rows:
        assert study.overrides(multitask, row, 0)["data.train_size"] == 5000
    # the row of the same name in two grids is one experiment: the same params in both
    assert study.overrides(multitask, "lite0-5000-imagenet", 1) == study.overrides(
        finetune, "lite0-5000-imagenet", 1
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("rows:\n  a: {train.lrr: 0.1}\n", "row 'a': params.yaml: unknown key 'train.lrr'"),
        ("rows:\n  a: {train.lr: -1}\n", "row 'a': params.yaml: train.lr = -1"),
        ("rows: {}\n", "at least one row"),
        ("regime: {}\nrowz:\n  a: {}\n", "unknown: rowz"),
        ("rows:\n  a: [1, 2]\n", "row 'a' must map params to values"),
        ("rows: [\n", "not valid YAML"),
    ],
)
def test_a_bad_grid_is_refused_with_one_line(tmp_path, monkeypatch, text, message):
    monkeypatch.setattr(study, "GRIDS_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamsError) as err:
        study.load_grid("bad", base={})
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ParamsError, match="no grid 'nope' \\(known: bad\\)"):
        study.load_grid("nope", base={})


def test_a_row_added_in_yaml_is_queued(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "GRIDS_DIR", tmp_path)
    (tmp_path / "mine.yaml").write_text(
        "regime: {train.epochs: 2}\nseeds: [5]\nrows:\n  tiny-dropout: {model.dropout: 0.2}\n"
    )
    grid = study.load_grid("mine", base={})
    assert grid.seeds == (5,)
    todo = study.experiments(grid, ["tiny-dropout"], [5], prefix="p")
    assert todo == [("p-tiny-dropout-s5", {"train.epochs": 2, "model.dropout": 0.2, "seed": 5})]

    # dvcqueue.run queues them in order, then starts the queue and waits for the new tasks only
    queued = []

    def fake_run(cmd, **kw):
        queued.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dvcqueue.subprocess, "run", fake_run)
    statuses = iter([STATUS, STATUS + "e5f0a1b  p-tiny-dropout-s5  02:40 AM   Queued\n"])
    monkeypatch.setattr(dvcqueue, "queue_status", lambda: next(statuses))
    waited = []
    monkeypatch.setattr(dvcqueue, "wait", lambda ours, tool: waited.append(ours) or [])
    assert dvcqueue.run(todo, 2, "study") == []
    assert queued == [
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-n",
            "p-tiny-dropout-s5",
            "-S",
            "train.epochs=2",
            "-S",
            "model.dropout=0.2",
            "-S",
            "seed=5",
        ],
        ["dvc", "queue", "start", "-j", "2"],
    ]
    assert waited == [{"e5f0a1b": "p-tiny-dropout-s5"}]


def test_a_failed_experiment_still_gets_the_table_then_one_error_line(tmp_path, monkeypatch):
    """The table and the comparison (of what finished, under the pass's prefix) are written
    before the study exits non-zero naming what failed."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    monkeypatch.setattr(study, "check_committed_params", lambda: None)
    monkeypatch.setattr(
        sys, "argv", ["study", "run", "--rows", "baseline,dropout", "--seeds", "0", "--prefix", "q"]
    )
    monkeypatch.setattr(study.dvcqueue, "run", lambda todo, jobs, tool: ["q-dropout-s0"])
    monkeypatch.setattr(study, "table", lambda *a: "| the table |\n")
    compared = []
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, check: compared.append(cmd))
    with pytest.raises(SystemExit) as exit_:
        study.main()
    assert str(exit_.value) == "error (study): 1 experiment(s) failed: q-dropout-s0"
    assert (tmp_path / "reports/q.md").read_text() == "| the table |\n"
    assert compared[0][-3:] == ["q-baseline-s0", "--prefix", "q"]


def test_a_pass_under_other_names_or_another_grid_keeps_the_study_table():
    assert study.default_out("study", "regularization") == Path("reports/study.md")
    assert study.default_out("study", "finetune") == Path("reports/study-finetune.md")
    assert study.default_out("quick", "regularization") == Path("reports/quick.md")


def test_the_study_refuses_uncommitted_params(tmp_path, monkeypatch):
    """Rows are built from the committed params.yaml: after a `dvc exp run -S model.dropout=0.3`
    left its value in the workspace, the study would label a dropout run `baseline`."""
    monkeypatch.chdir(tmp_path)
    git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True)
    git("init", "-q")
    Path("params.yaml").write_text(yaml.safe_dump({"model": {"dropout": 0.0}, "seed": 0}))
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    study.check_committed_params(Path("params.yaml"))  # clean: fine
    Path("params.yaml").write_text(yaml.safe_dump({"model": {"dropout": 0.3}, "seed": 0}))
    with pytest.raises(ParamsError, match=r"uncommitted changes \(model.dropout=0.3\)"):
        study.check_committed_params(Path("params.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "stages.experiments.study", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 1 and result.stderr.strip().startswith(
        "error (study): params.yaml has"
    )
    assert "Traceback" not in result.stderr
