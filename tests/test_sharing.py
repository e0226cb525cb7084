"""A shared machine: each process that computes (train, evaluate) counts the pipeline's others on
this machine and takes its share of the cores, following them as they come and go
(runtime.CoreShare; docs/speed.md, "A shared machine"). No timings here: benchmarks/threads.py
measures what the shares are worth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import REPO, run_stage

from stages import runtime
from stages.runtime import CoreShare

CORES = len(os.sched_getaffinity(0))

# Another process that shares the cores from `folder`: says its threads, then waits for a line.
COMPANY = """
import sys, torch
from pathlib import Path
from stages.runtime import CoreShare
with CoreShare(folder=Path(sys.argv[1])):
    print(torch.get_num_threads(), flush=True)
    sys.stdin.readline()
"""


def start_company(folder: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", COMPANY, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return proc, int(proc.stdout.readline())


def stop(proc: subprocess.Popen) -> None:
    proc.communicate("done\n", timeout=60)


def test_a_process_alone_takes_every_core_and_halves_them_while_another_computes(tmp_path):
    before = torch.get_num_threads()
    try:
        with CoreShare(folder=tmp_path, every=0) as share:
            assert share.processes() == 1 and torch.get_num_threads() == CORES
            company, its_threads = start_company(tmp_path)
            assert its_threads == max(1, CORES // 2)  # it saw us when it came
            runtime.keep_fair()  # between two batches: we see it
            assert share.processes() == 2 and torch.get_num_threads() == max(1, CORES // 2)
            stop(company)
            runtime.keep_fair()
            assert torch.get_num_threads() == CORES  # back to every core once it has gone
            assert share.fewest_since_asked() == max(1, CORES // 2)
            assert share.fewest_since_asked() == CORES
        assert list(tmp_path.iterdir()) == []  # it leaves no file behind
    finally:
        torch.set_num_threads(before)


def test_the_count_is_read_again_only_every_so_often(tmp_path):
    before = torch.get_num_threads()
    try:
        with CoreShare(folder=tmp_path, every=3600):
            company, _ = start_company(tmp_path)
            runtime.keep_fair()  # read within the hour: not again
            assert torch.get_num_threads() == CORES
            stop(company)
    finally:
        torch.set_num_threads(before)


def test_train_threads_fixes_the_threads_but_still_counts_for_the_others(tmp_path):
    before = torch.get_num_threads()
    try:
        with CoreShare(fixed=3, folder=tmp_path, every=0) as share:
            company, its_threads = start_company(tmp_path)
            runtime.keep_fair()
            assert torch.get_num_threads() == 3 and its_threads == max(1, CORES // 2)
            assert share.processes() == 2
            stop(company)
    finally:
        torch.set_num_threads(before)


def test_files_of_processes_that_have_gone_are_not_counted_and_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}-123").touch()  # killed before it could remove its file
    parent = os.getppid()
    (tmp_path / f"{parent}-1").touch()  # a live pid, but another process's start: reused
    (tmp_path / "not-a-pid").touch()
    with CoreShare(folder=tmp_path) as share:
        assert share.processes() == 1
        assert [p.name for p in tmp_path.iterdir()] == [share.file.name]


def test_a_share_inside_another_of_the_same_process_hands_back_to_it(tmp_path):
    """A stage's main() under the test suite (which shares the cores as one process): the inner
    share is the same file, which stays until the outer one ends."""
    before = torch.get_num_threads()
    try:
        with CoreShare(folder=tmp_path) as outer:
            with CoreShare(folder=tmp_path, every=0) as inner:
                assert inner.file == outer.file and inner.processes() == 1
            assert list(tmp_path.iterdir()) == [outer.file]
            assert runtime._share is outer
        assert list(tmp_path.iterdir()) == []
    finally:
        torch.set_num_threads(before)


def test_the_train_stage_logs_the_threads_of_each_epoch_and_shares_with_company(
    prepared, tmp_path_factory
):
    """A training beside another process of the pipeline trains with its share of the cores and
    says so: `torch_threads` per epoch in MLflow (the fewest it used), and on each epoch's line."""
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["train"]["threads"] = 0  # the default: follow the company (the tests' TINY fix 1)
    (prepared / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    folder = tmp_path_factory.mktemp("sharing")
    company, _ = start_company(folder)
    try:
        out = run_stage("train", prepared, env={"OVERFIT_SHARING_DIR": str(folder)})
    finally:
        stop(company)
    assert out.returncode == 0, out.stderr
    share = max(1, CORES // 2)
    lines = [line for line in out.stdout.splitlines() if line.startswith("epoch")]
    assert lines and all(line.endswith(f" {share} thread" + "s" * (share > 1)) for line in lines)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    run_id = json.loads((prepared / "models/run.json").read_text())["run_id"]
    history = client.get_metric_history(run_id, "torch_threads")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (epoch, share) for epoch in range(1, len(lines) + 1)
    ]
    assert list(folder.iterdir()) == []  # neither left a file behind


def test_a_folder_it_cannot_write_is_one_warning_and_the_training_goes_on(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    before = torch.get_num_threads()
    try:
        with CoreShare(folder=blocked, every=0) as share:
            runtime.keep_fair()
            assert share.processes() == 1 and torch.get_num_threads() == CORES
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert (
        out.startswith(f"warning: {blocked}: ") and "the other trainings can't see this one" in out
    )
    assert blocked.read_text() == "not a folder"
