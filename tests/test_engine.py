"""The one command (stages/experiments/engine.py): its checks, shards, queue and progress lines;
a search's trials and pruning; two shards on two clones against one tracking server; an
experiment that fails inside a stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, copy_repo, write_params
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from test_tracking_server import Server

from stages import params as P
from stages.errors import ParamsError
from stages.experiments import dvcqueue, engine, plan as plans

BIN = Path(sys.executable).parent  # the venv's: dvc, and the `python` that DVC's stages call
QUEUE = """Task     Name                            Created    Status
0199407  study-wider-model-s0            02:37 AM   Success
c62c203  study-wider-model-s2            02:37 AM   Running
4fb4e8a  study-dropout-s0                02:37 AM   Queued
d9b05b9  study-l1-s0                     02:37 AM   Failed

Worker status: 1 active, 0 idle
"""


def test_pending_counts_queued_and_running_tasks():
    assert dvcqueue.pending(QUEUE) == 2
    assert (
        dvcqueue.pending("Task     Name    Created    Status\n\nWorker status: 0 active, 0 idle\n")
        == 0
    )
    assert dvcqueue.tasks(QUEUE)["d9b05b9"] == ("study-l1-s0", "Failed")


def test_experiments_are_queued_in_order_then_the_new_tasks_waited_for(monkeypatch):
    todo = [("p-tiny-dropout-s5", {"train.epochs": 2, "model.dropout": 0.2, "seed": 5})]
    queued = []

    def fake_run(cmd, **kw):
        queued.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dvcqueue.subprocess, "run", fake_run)
    statuses = iter([QUEUE, QUEUE + "e5f0a1b  p-tiny-dropout-s5  02:40 AM   Queued\n"])
    monkeypatch.setattr(dvcqueue, "queue_status", lambda: next(statuses))
    waited = []
    monkeypatch.setattr(dvcqueue, "wait", lambda ours, tool, jobs: waited.append(ours) or [])
    assert dvcqueue.run(todo, 2, "engine") == []
    assert queued == [
        ["dvc", "exp", "run", "--queue", "-n", "p-tiny-dropout-s5"]
        + ["-S", "train.epochs=2", "-S", "model.dropout=0.2", "-S", "seed=5"],
        ["dvc", "queue", "start", "-j", "2"],
    ]
    assert waited == [{"e5f0a1b": "p-tiny-dropout-s5"}]


def test_a_failed_experiment_still_gets_the_table_then_one_error_line(tmp_path, monkeypatch):
    """The table and the comparison (of what finished, under the pass's prefix) are written
    before the command exits non-zero naming what failed."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    monkeypatch.setattr(plans, "check_committed_params", lambda: None)
    argv = ["engine", "run", "--grid", "regularization", "--rows", "baseline,dropout"]
    monkeypatch.setattr(sys, "argv", [*argv, "--seeds", "0", "--prefix", "q"])
    monkeypatch.setattr(engine.dvcqueue, "run", lambda todo, jobs, tool: ["q-dropout-s0"])
    reported = []
    monkeypatch.setattr(engine, "report", lambda *a: reported.append(a[1]) or True)
    monkeypatch.setattr(engine, "finished_runs", lambda prefix, args: {"q-baseline-s0": "run"})
    compared = []
    monkeypatch.setattr(engine.subprocess, "run", lambda cmd, check: compared.append(cmd))
    with pytest.raises(SystemExit) as exit_:
        engine.main()
    assert str(exit_.value) == "error (engine): 1 experiment(s) failed: q-dropout-s0"
    assert reported == ["q"]
    assert compared[0][-3:] == ["q-baseline-s0", "--prefix", "q"]


def test_a_pass_of_some_rows_adds_its_runs_to_the_comparison_of_the_earlier_passes(
    tmp_path, monkeypatch
):
    """`--rows dropout` after a pass of the baseline: `<prefix>-comparison.md` shows every
    finished run of the plan's rows under the prefix, row by row, not only this pass's (it
    used to be written anew from this pass's runs, losing the earlier ones)."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    monkeypatch.setattr(plans, "check_committed_params", lambda: None)
    argv = ["engine", "run", "--grid", "regularization", "--rows", "dropout", "--prefix", "q"]
    monkeypatch.setattr(sys, "argv", [*argv, "--seeds", "1"])
    monkeypatch.setattr(engine.dvcqueue, "run", lambda todo, jobs, tool: [])
    monkeypatch.setattr(engine, "report", lambda *a: True)
    earlier_and_now = ["q-baseline-s0", "q-dropout-s1", "q-baseline-s1", "other-dropout-s1"]
    monkeypatch.setattr(
        engine, "finished_runs", lambda prefix, args: dict.fromkeys(earlier_and_now)
    )
    compared = []
    monkeypatch.setattr(engine.subprocess, "run", lambda cmd, check: compared.append(cmd))
    engine.main()
    shown = compared[0][compared[0].index("--exps") + 1].split(",")
    assert shown == ["q-baseline-s0", "q-baseline-s1", "q-dropout-s1"]


def test_the_table_of_a_pass_under_other_names_or_another_plan_keeps_the_study_table():
    from stages.experiments.reports import table

    study, finetune = plans.load("regularization"), plans.load("finetune")
    assert table.out_file(study, "study") == Path("reports/study.md")
    assert table.out_file(finetune, "study") == Path("reports/study-finetune.md")
    assert table.out_file(study, "quick") == Path("reports/quick-regularization.md")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 40])
def test_shards_cover_every_point_exactly_once(n):
    s = plans.load("sweep")
    todo = plans.experiments(s, plans.select(s, None), [0, 1, 2], "sweep")
    parts = [engine.shard(todo, f"{i}/{n}") for i in range(1, n + 1)]
    names = [name for part in parts for name, _ in part]
    assert sorted(names) == sorted(name for name, _ in todo)  # the union, each once
    assert len(names) == len(set(names))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert engine.shard(todo, f"1/{n}") == engine.shard(todo, f"1/{n}")  # deterministic


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused(spec):
    with pytest.raises(ParamsError, match="expected i/n"):
        engine.shard([1, 2], spec)


def test_the_command_refuses_uncommitted_params_and_unknown_techniques(tmp_path):
    """Experiments are built from the committed params.yaml; both errors are one line, before any
    experiment is queued (no DVC repository here: queueing would fail loudly)."""
    write_params(tmp_path)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "sweep", *a],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    result = run("--techniques", "l2,l3")
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error (engine): unknown technique l3; the plan has: "
        + ", ".join(t.name for t in plans.load("sweep").techniques)
    ]
    write_params(tmp_path, **{"model.dropout": 0.3})
    result = run()
    assert result.returncode == 1 and result.stderr.startswith(
        "error (engine): params.yaml has uncommitted changes (model.dropout=0.3)"
    )
    assert len(result.stderr.splitlines()) == 1


STATUS = """Task     Name                 Created    Status
0199407  old-run-s0           02:37 AM   Success
c62c203  p-a-s0               02:37 AM   {a}
4fb4e8a  p-b-s0               02:37 AM   {b}

Worker status: 1 active, 0 idle
"""


def test_the_wait_prints_a_line_per_ended_experiment_and_returns_the_failed(monkeypatch, capsys):
    states = iter([("Running", "Queued"), ("Success", "Running"), ("Success", "Failed")])
    monkeypatch.setattr(
        dvcqueue, "queue_status", lambda: STATUS.format(**dict(zip("ab", next(states))))
    )
    monkeypatch.setattr(dvcqueue, "result_line", lambda name: "test accuracy 41.0%, 1.5 min")
    monkeypatch.setattr(dvcqueue, "first_error", lambda name: "error (download): bad sha256")
    failed = dvcqueue.wait({"c62c203": "p-a-s0", "4fb4e8a": "p-b-s0"}, "sweep", poll_seconds=0)
    assert failed == ["p-b-s0"]
    assert capsys.readouterr().out.splitlines() == [
        "sweep: [1/2] p-a-s0: test accuracy 41.0%, 1.5 min",
        "sweep: [2/2] p-b-s0 FAILED: error (download): bad sha256",
    ]
    assert dvcqueue.pending(STATUS.format(a="Running", b="Queued")) == 2


def test_the_wait_starts_workers_again_when_ours_are_queued_and_workers_left(monkeypatch):
    """Seen here: a queue worker died between two tasks (DVC's broker race, JSONDecodeError) and
    the pass's other experiments waited for the one worker left. While some of ours are queued
    and fewer than `jobs` workers are left, the wait starts them again; not once nothing of ours
    is queued."""
    listings = iter(
        [
            STATUS.format(a="Running", b="Queued"),  # one worker of two, b waiting: start
            STATUS.format(a="Running", b="Running").replace("1 active", "2 active"),
            STATUS.format(a="Success", b="Running"),  # one left, nothing queued: fine
            STATUS.format(a="Success", b="Success"),
        ]
    )
    monkeypatch.setattr(dvcqueue, "queue_status", lambda: next(listings))
    monkeypatch.setattr(dvcqueue, "result_line", lambda name: "test accuracy 41.0%, 1.5 min")
    started = []
    monkeypatch.setattr(dvcqueue, "start_workers", started.append)
    monkeypatch.setattr(dvcqueue, "workers_that_died_starting", lambda: [2])
    ours = {"c62c203": "p-a-s0", "4fb4e8a": "p-b-s0"}
    assert dvcqueue.wait(ours, "engine", poll_seconds=0, jobs=2) == []
    assert started == [2]
    # a worker not listed yet (still starting), none dead: left alone
    monkeypatch.setattr(dvcqueue, "workers_that_died_starting", lambda: [])
    dvcqueue.keep_workers(STATUS.format(a="Running", b="Queued"), ["4fb4e8a"], 2, "engine")
    assert started == [2]
    assert dvcqueue.workers(STATUS) == 1 and dvcqueue.workers("no listing") == 0


def test_the_wait_looks_again_as_soon_as_a_task_ends(tmp_path, monkeypatch, capsys):
    """Each `dvc queue status` is a DVC start-up, so the wait runs it every poll_seconds; but a
    task that ends (its file in the queue's result folder) is seen at once, not a poll later."""
    import threading
    import time

    monkeypatch.chdir(tmp_path)
    results = tmp_path / dvcqueue.RESULTS
    results.mkdir(parents=True)
    monkeypatch.setattr(dvcqueue, "queue_status", lambda: STATUS.format(a="Success", b="Success"))
    monkeypatch.setattr(dvcqueue, "result_line", lambda name: "test accuracy 41.0%, 1.5 min")
    ends = threading.Timer(0.2, lambda: (results / "celery-task-meta-1").write_text("{}"))
    ends.start()
    started = time.monotonic()
    failed = dvcqueue.wait({"c62c203": "p-a-s0", "4fb4e8a": "p-b-s0"}, "sweep", poll_seconds=60)
    assert failed == [] and time.monotonic() - started < 30
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_running_task_missing_from_one_listing_is_not_taken_for_finished(monkeypatch, capsys):
    """Seen here: one `dvc queue status` lacked a task that was still running; the wait printed
    it as finished (with no MLflow run) and counted it. A task has ended when it stays gone."""
    without_b = STATUS.replace("4fb4e8a  p-b-s0               02:37 AM   {b}\n", "")
    listings = iter([without_b, STATUS, without_b, without_b])
    monkeypatch.setattr(
        dvcqueue, "queue_status", lambda: next(listings).format(a="Success", b="Running")
    )
    monkeypatch.setattr(dvcqueue, "result_line", lambda name: "test accuracy 41.0%, 1.5 min")
    failed = dvcqueue.wait({"c62c203": "p-a-s0", "4fb4e8a": "p-b-s0"}, "sweep", poll_seconds=0)
    assert failed == []
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "sweep: [1/2] p-a-s0: test accuracy 41.0%, 1.5 min",
        "sweep: [2/2] p-b-s0: test accuracy 41.0%, 1.5 min",
    ]
    with pytest.raises(StopIteration):  # it took the fourth listing, the second miss in a row
        next(listings)


def test_a_running_task_whose_worker_is_gone_is_reported_lost_not_waited_for(
    tmp_path, monkeypatch, capsys
):
    """Seen here: a queue worker stopped "due to empty queue" while DVC still listed our task
    Running; the wait waited for ever. With no worker left for ORPHAN_LISTINGS listings in a
    row, the task counts as failed, in one line that says what to do."""
    workerless = STATUS.format(a="Success", b="Running").replace("1 active", "0 active")
    listings = iter([STATUS.format(a="Success", b="Running")] + [workerless] * 5)
    monkeypatch.setattr(dvcqueue, "queue_status", lambda: next(listings))
    monkeypatch.setattr(dvcqueue, "result_line", lambda name: "test accuracy 41.0%, 1.5 min")
    monkeypatch.chdir(tmp_path)  # no pid files: no worker alive either
    failed = dvcqueue.wait({"c62c203": "p-a-s0", "4fb4e8a": "p-b-s0"}, "sweep", poll_seconds=0)
    assert failed == ["p-b-s0"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sweep: [1/2] p-a-s0: test accuracy 41.0%, 1.5 min"
    assert out[1].startswith("sweep: [2/2] p-b-s0 LOST: DVC lists it Running but no queue worker")
    assert len(list(listings)) == 5 - dvcqueue.ORPHAN_LISTINGS  # not one listing before
    # live_workers reads the workers' pid files: a live process counts, a dead pid does not
    (tmp_path / dvcqueue.WORKERS).mkdir(parents=True)
    (tmp_path / dvcqueue.WORKERS / "dvc-exp-worker-1.pid").write_text(str(os.getpid()))
    (tmp_path / dvcqueue.WORKERS / "dvc-exp-worker-2.pid").write_text("999999999")
    assert dvcqueue.live_workers() == [os.getpid()]


@pytest.mark.parametrize("why", [ParamsError("no finished run"), MlflowException("server down")])
def test_a_report_that_cannot_be_built_is_one_line(monkeypatch, capsys, why):
    from argparse import Namespace

    from stages.experiments.reports import path

    def fail(*args, **kwargs):
        raise why

    monkeypatch.setattr(path, "build", fail)
    args = Namespace(
        force=False,
        seeds=None,
        storage="sqlite:///unused.db",
        out=Path("reports"),
        tracking_uri=None,
        without_dvc=False,
    )
    assert engine.report(plans.load("sweep"), "p", args) is False
    assert capsys.readouterr().out == f"engine: no report: {why}\n"


def test_the_first_error_line_of_a_log(monkeypatch):
    log = (
        "Running stage 'download':\n> python -m stages.download\n"
        "error (download): data.sha256 mismatch\nERROR: failed to reproduce 'download'\n"
    )
    fake = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, log, "")
    monkeypatch.setattr(dvcqueue.subprocess, "run", fake)
    assert dvcqueue.first_error("x") == "error (download): data.sha256 mismatch"
    log = "Running stage 'train':\nERROR: failed to reproduce 'train'\n"
    assert dvcqueue.first_error("x") == "ERROR: failed to reproduce 'train'"


def test_starting_the_workers_does_not_hand_them_our_output(tmp_path):
    """DVC's `queue start` leaves a process per worker holding the stdout it was given (CI saw
    a study that had ended wait 10 minutes on its pipe). A `dvc` that does the same: a study
    run through a pipe must return when it ends, not when the workers go."""
    fake = tmp_path / "dvc"
    fake.write_text(
        "#!/bin/bash\necho \"Started '2' new experiments task queue workers.\"\n"
        "sleep 30 &\n"  # the worker's keeper: it inherits our stdout and stderr
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    code = "from stages.experiments import dvcqueue; dvcqueue.start_workers(2); print('done')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Started '2' new experiments task queue workers.\ndone\n"


def test_a_queue_that_cannot_start_is_an_error(tmp_path, monkeypatch):
    fake = tmp_path / "dvc"
    fake.write_text("#!/bin/bash\necho 'ERROR: no queue here' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(subprocess.CalledProcessError):
        dvcqueue.start_workers(2)


# --- two machines, one tracking server -----------------------------------------------------

TINY_GRID = """regime: {train.epochs: 2}
seeds: [0]
techniques:
  dropout: {param: model.dropout, values: [0.5], scale: linear}
"""


def sh(repo: Path, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    for var in ("DVC_ROOT", "DVC_EXP_NAME"):
        full.pop(var, None)
    return subprocess.run(cmd, cwd=repo, env=full, capture_output=True, text=True, timeout=600)


def ok(repo: Path, *cmd: str) -> str:
    result = sh(repo, *cmd)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def team(tmp_path_factory, pickle_archive):
    """A tiny repository pushed to a bare git remote with a local-folder DVC remote, two clones
    of it (two machines), and one MLflow server."""
    root = tmp_path_factory.mktemp("team")
    origin = copy_repo(root / "origin")
    write_params(origin, **{"data.source": str(pickle_archive), **TINY})
    (origin / "stages/experiments/plans/tiny.yaml").write_text(TINY_GRID)
    ok(origin, "git", "init", "-q", "-b", "main")
    ok(origin, "dvc", "remote", "add", "-d", "storage", str(root / "dvc-storage"))
    ok(origin, "git", "add", "-A")
    ok(origin, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny")
    ok(root, "git", "init", "-q", "--bare", "-b", "main", "remote.git")
    ok(origin, "git", "push", "-q", str(root / "remote.git"), "main")
    for machine in ("a", "b"):
        ok(root, "git", "clone", "-q", str(root / "remote.git"), machine)
        ok(root / machine, "git", "config", "user.email", "t@t")
        ok(root / machine, "git", "config", "user.name", "t")
    server = Server(root).start()
    yield root, server
    server.kill()
    for machine in ("a", "b"):
        sh(root / machine, "dvc", "queue", "stop", "--kill")


def test_two_shards_on_two_machines_reach_one_server_and_one_git_remote(team):
    root, server = team
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = server.uri
    cmd = [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "tiny"]
    cmd += ["--prefix", "team"]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard", f"{i}/2", "--push", "origin"],
            cwd=root / machine,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, machine in ((1, "a"), (2, "b"))
    ]
    try:
        outs = [proc.communicate(timeout=1200) for proc in procs]
    finally:
        for proc in procs:  # none left running if the wait gave up
            proc.kill()
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out + err
    names = ["team-baseline-s0", "team-dropout-0.5-s0"]
    # a progress line per experiment, on the machine that ran it
    assert "engine: [1/1] team-baseline-s0: test accuracy" in outs[0][0]
    assert "engine: [1/1] team-dropout-0.5-s0: test accuracy" in outs[1][0]

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("overfitting")
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    runs = [r for r in finished if "dvc.exp_name" in r.data.tags]  # the parent run has none
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == names
    assert all("test_accuracy" in r.data.metrics for r in runs)
    refs = ok(root, "git", "ls-remote", str(root / "remote.git"), "refs/exps/*")
    assert sorted(line.rsplit("/", 1)[1] for line in refs.splitlines()) == names
    assert any((root / "dvc-storage").rglob("*"))  # the outputs, in the DVC remote
    # Built again once both shards are in, from the server: one report, every row, one parent.
    cmd = [sys.executable, "-m", "stages.experiments.engine", "report", "--grid", "tiny"]
    cmd += ["--prefix", "team"]
    result = sh(root / "a", *cmd, env={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 0, result.stdout + result.stderr
    text = (root / "a/reports/team-path.md").read_text()
    assert "dropout" in text and "baseline" in text
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.prefix` = 'team'")
    assert len(runs) == 1, "the two machines' reports made two parent runs"
    query = "tags.`dvc.exp_name` LIKE 'team-%'"
    children = client.search_runs([experiment.experiment_id], query)
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {runs[0].info.run_id}


def test_a_point_that_ran_before_is_restored_and_still_one_mlflow_run_of_its_name(team):
    """Machine a ran team-baseline-s0 above. The same point under another prefix has the same
    params: DVC's run cache restores its outputs and no stage runs, so nothing would be logged;
    the engine records it as a run of its own name, with the metrics of the run it came from."""
    root, server = team
    cmd = [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "tiny"]
    cmd += ["--prefix", "again", "--shard", "1/2"]  # the first point: baseline
    result = sh(root / "a", *cmd, env={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("overfitting")

    def run_named(name):
        (run,) = client.search_runs([experiment.experiment_id], f"tags.`dvc.exp_name` = '{name}'")
        return run

    source, again = run_named("team-baseline-s0"), run_named("again-baseline-s0")
    assert "again-baseline-s0: test accuracy" in result.stdout
    assert f"restored by DVC from run {source.info.run_id}" in result.stdout
    assert again.data.tags["restored_from"] == source.info.run_id
    assert again.info.status == "FINISHED"
    assert again.data.metrics["test_accuracy"] == source.data.metrics["test_accuracy"]
    curve = [m.value for m in client.get_metric_history(again.info.run_id, "val_accuracy")]
    assert curve == [m.value for m in client.get_metric_history(source.info.run_id, "val_accuracy")]
    assert len(curve) == TINY["train.epochs"]
    assert again.data.params["model.dropout"] == source.data.params["model.dropout"]


def test_two_machines_sharing_a_storage_take_the_points_as_they_are_free(team, postgres_cluster):
    """No --shard: both machines (two clones) run the same command against one Optuna storage
    on PostgreSQL, as across machines, and one tracking server; every point runs once, on
    whichever machine took it."""
    from stages.tracking import server as pg

    root, server = team
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = server.uri
    pg.postgres("createdb", "-h", str(postgres_cluster), "-U", pg.ROLE, "points")
    cmd = [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "tiny"]
    cmd += ["--prefix", "free", "--storage", pg.database_uri(postgres_cluster, "points")]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=root / machine,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for machine in ("a", "b")
    ]
    try:
        outs = [proc.communicate(timeout=1200) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out + err
    said = "".join(out for out, _ in outs)
    for name in ("free-baseline-s0", "free-dropout-0.5-s0"):
        assert said.count(f"{name}: test accuracy") == 1, said
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("overfitting")
    runs = client.search_runs([experiment.experiment_id], "tags.`dvc.exp_name` LIKE 'free-%'")
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == [
        "free-baseline-s0",
        "free-dropout-0.5-s0",
    ]


def test_an_experiment_failing_inside_a_stage_is_named_and_exits_non_zero(team):
    """A wrong data.sha256 is valid params (64 hex digits): only the download stage, comparing
    it with the archive's, finds it wrong."""
    root, server = team
    result = sh(
        root / "a",
        sys.executable,
        "-m",
        "stages.experiments.engine",
        "run",
        "--grid",
        "tiny",
        "--prefix",
        "bad",
        "--shard",
        "1/2",  # the baseline alone
        "--set",
        "data.sha256=" + "ab" * 32,
        env={"MLFLOW_TRACKING_URI": server.uri},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "engine: [1/1] bad-baseline-s0 FAILED: error (download)" in result.stdout
    assert "report" in result.stdout  # the report of what finished is still attempted
    assert result.stderr.strip().splitlines()[-1] == (
        "error (engine): 1 experiment(s) failed: bad-baseline-s0"
    )
    assert "Traceback" not in result.stderr


# --- a search: trials, pruning, bad input --------------------------------------------------

TINY_SPACE = """regime: {train.epochs: 3}
seeds: [0]
search: {seed: 3, pruner: hyperband, seeds_of_the_best: [0, 1]}
space:
  model.dropout: {uniform: [0.0, 0.5]}
  augment.online: {categorical: [false, true]}
  augment.crop_padding: {int: [1, 4], when: {augment.online: true}}
"""


def space_plan(tmp_path, monkeypatch, text: str = TINY_SPACE) -> plans.Plan:
    monkeypatch.setattr(plans, "PLANS_DIR", tmp_path)
    (tmp_path / "space.yaml").write_text(text)
    return plans.load("space", base=P.read_yaml())


def test_a_sampled_point_leaves_out_what_its_conditions_rule_out(tmp_path, monkeypatch):
    import optuna

    plan = space_plan(tmp_path, monkeypatch)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    points = [engine.sample(study.ask(), plan.space) for _ in range(30)]
    assert all(0.0 <= p["model.dropout"] <= 0.5 for p in points)
    assert all(("augment.crop_padding" in p) == p["augment.online"] for p in points)
    assert {p["augment.online"] for p in points} == {False, True}


def test_a_storage_that_cannot_be_reached_or_holds_another_space_is_one_line(tmp_path, monkeypatch):
    plan = space_plan(tmp_path, monkeypatch)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = engine.open_study(plan, "s", storage)
    assert study.user_attrs["plan"] == "space"
    assert engine.open_study(plan, "s", storage).study_name == "s"  # the same space: continued
    other = space_plan(tmp_path, monkeypatch, TINY_SPACE.replace("0.5]", "0.6]"))
    with pytest.raises(ParamsError, match="the study 's' in .* was made with another space"):
        engine.open_study(other, "s", storage)
    for url in ("postgresql://nobody@127.0.0.1:1/none", "nosuch://x"):
        with pytest.raises(ParamsError) as err:
            engine.open_study(plan, "s", url)
        assert str(err.value).startswith(f"--storage {url}: ") and "\n" not in str(err.value)


def test_a_new_study_tries_the_plans_first_point_before_drawing(tmp_path):
    """search.first (finetune-cpu-search-5k starts from the 1,000-label search's best): the new
    study's first trial has those params and draws the rest; a study that goes on doesn't
    queue it again."""
    plan = plans.load("finetune-cpu-search-5k")
    first = plan.search["first"]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = engine.open_study(plan, "s", storage)
    point = engine.sample(study.ask(), plan.space)
    assert {k: point[k] for k in first} == first
    assert set(point) == {d.param for d in plan.space}  # the others drawn
    again = engine.open_study(plan, "s", storage)
    assert engine.sample(again.ask(), plan.space) != point  # drawn, not the first point again


def test_a_pruned_trial_stops_training_and_is_recorded_as_pruned(prepared, monkeypatch):
    """The train stage on tiny data, as a search's trial whose pruner (successive halving)
    has seen better trials at the first rung: it stops after that epoch, writes its outputs
    with the DVC metric `pruned`, tags its MLflow run, and its epoch is in the study."""
    import optuna

    from stages import train
    from stages.tracking import trial as trials

    storage = f"sqlite:///{prepared / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(3):  # finished trials that passed the first rung with 99%
        study.add_trial(
            optuna.trial.create_trial(
                value=0.99, intermediate_values={1: 0.99}, system_attrs={"completed_rung_0": 0.99}
            )
        )
    trial = study.ask()
    pruner = {"kind": "halving", "min_epochs": 1, "epochs": 60}
    handle = trials.Handle(storage, "s", trial._trial_id, trial.number, pruner)
    trials.write_handle("s-t3", handle)
    monkeypatch.setenv("DVC_EXP_NAME", "s-t3")
    train.main()
    metrics = json.loads((prepared / "metrics/train.json").read_text())
    assert metrics["pruned"] == 1 and metrics["epochs_run"] == 1
    frozen = study.trials[trial.number]
    assert list(frozen.intermediate_values) == [1]
    run_id = json.loads((prepared / "models/run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}").get_run(run_id)
    assert run.data.tags["optuna.pruned"] == "true" and run.data.metrics["final_pruned"] == 1


def test_outside_a_search_there_is_no_trial(tmp_path, monkeypatch):
    from stages.tracking import trial as trials

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert trials.for_this_run() is None
    monkeypatch.setenv("DVC_EXP_NAME", "plain-run")
    assert trials.for_this_run() is None  # no handle file of that name


@pytest.fixture(scope="module")
def search_repo(tmp_path_factory, pickle_archive):
    """A tiny repository with a search plan, committed (no remote: one machine, SQLite)."""
    repo = copy_repo(tmp_path_factory.mktemp("search") / "repo")
    write_params(repo, **{"data.source": str(pickle_archive), **TINY})
    (repo / "stages/experiments/plans/space.yaml").write_text(TINY_SPACE)
    ok(repo, "git", "init", "-q", "-b", "main")
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny")
    yield repo
    sh(repo, "dvc", "queue", "stop", "--kill")


def test_a_search_runs_its_trials_as_dvc_experiments_and_mlflow_runs_and_continues(search_repo):
    repo = search_repo
    cmd = [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "space"]
    first = sh(repo, *cmd, "--trials", "2", "--jobs", "2")  # one batch of two
    assert first.returncode == 0, first.stdout + first.stderr
    import optuna

    study = optuna.load_study(study_name="space", storage=f"sqlite:///{repo / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    # every trial a DVC experiment with its sampled params, and an MLflow run of that name
    shown = json.loads(ok(repo, "dvc", "exp", "show", "--json"))
    names = {
        exp.get("name")
        for commit in shown
        for exps in commit.get("experiments") or []
        for exp in exps.get("revs") or []
    }
    best = study.best_trial.number
    assert {"space-t0", "space-t1", f"space-t{best}-s1"} <= names, names
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("overfitting")
    runs = {
        r.data.tags["dvc.exp_name"]: r
        for r in client.search_runs(
            [experiment.experiment_id], "tags.`dvc.exp_name` LIKE 'space-%'"
        )
    }
    for t in study.trials:
        run = runs[f"space-t{t.number}"]
        assert float(run.data.params["model.dropout"]) == pytest.approx(t.params["model.dropout"])
        assert run.data.tags["optuna.pruned"] in ("true", "false")
    parent = client.search_runs([experiment.experiment_id], "tags.`sweep.prefix` = 'space'")
    assert len(parent) == 1
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs.values()} == {parent[0].info.run_id}
    report = (repo / "reports/space-search.md").read_text()
    assert "## The best trial: space-t" in report and "test " in report
    assert (repo / "reports/space-search-history.png").exists()
    # run again with more trials: the same study goes on
    again = sh(repo, *cmd, "--trials", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{repo / 'optuna.db'}")
    assert len(study.trials) == 3


@pytest.fixture(scope="module")
def postgres_cluster():
    """A PostgreSQL cluster on a Unix socket (stages/tracking/server.py's, as `make
    mlflow-server` starts it); skipped without PostgreSQL unless REQUIRE_POSTGRES=1."""
    import shutil
    import tempfile

    from stages.errors import StageError
    from stages.tracking import server

    try:
        server.pg_bin("initdb")
    except StageError:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip("PostgreSQL is not installed")
    folder = Path(tempfile.mkdtemp(prefix="optuna-pg-", dir="/tmp"))
    folder.chmod(0o755)
    server.start_postgres(folder / "db")
    yield folder / "db"
    server.stop_postgres(folder / "db")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """An empty Optuna storage: a SQLite file, or a new database of the PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    from stages.tracking import server

    folder = request.getfixturevalue("postgres_cluster")
    name = f"optuna_{tmp_path.name.replace('-', '_').lower()}"
    server.postgres("createdb", "-h", str(folder), "-U", server.ROLE, name)
    return server.database_uri(folder, name)


def test_a_worker_killed_mid_trial_leaves_its_trial_failed_and_retried(
    tmp_path, monkeypatch, storage_url
):
    """A worker (its engine, beating for its trials) SIGKILLed: once its heartbeats are older
    than the grace period, the next worker that looks fails the trial and queues its params
    again, so nothing is lost."""
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    plan = space_plan(tmp_path, monkeypatch)
    url = storage_url
    engine.open_study(plan, "s", url)
    code = f"""
import time, optuna
from stages.experiments import engine
storage = engine.storage_for({url!r}, heartbeat=1, grace=2)
study = optuna.load_study(study_name="s", storage=storage)
trial = study.ask({{"model.dropout": optuna.distributions.FloatDistribution(0.0, 0.5)}})
with engine.beating(storage, [trial._trial_id]):
    print(trial.number, flush=True)
    time.sleep(600)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    worker = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    number = int(worker.stdout.readline())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    study = optuna.load_study(study_name="s", storage=engine.storage_for(url, 1, 2))
    killed = study.trials[number]
    assert killed.state == TrialState.RUNNING  # nobody has looked yet
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[number].state == TrialState.FAIL
    [again] = [t for t in trials if t.state == TrialState.WAITING]
    assert again.params == killed.params and again.system_attrs["failed_trial"] == number


def test_workers_sharing_a_storage_take_every_point_once(tmp_path, monkeypatch, storage_url):
    """A study or a path with --storage: its points are an Optuna grid, and workers (here two
    threads, each two at a time) take the next point nobody has taken — no --shard; a point
    whose experiment failed is not taken again, and a second pass finds nothing left."""
    import threading
    import time
    from argparse import Namespace

    todo = [(f"p-r{i}-s0", {"seed": 0, "model.dropout": i / 10}) for i in range(7)]
    ran, lock = [], threading.Lock()

    def fake_run(batch, jobs, tool):
        with lock:
            ran.extend(name for name, _ in batch)
        time.sleep(0.2)
        return [name for name, _ in batch if name == "p-r3-s0"]

    monkeypatch.setattr(engine.dvcqueue, "run", fake_run)
    args = Namespace(jobs=2, storage=storage_url, runner=engine.dvcqueue)
    failed, errors = [], []

    def worker() -> None:
        try:
            failed.extend(engine.take_points(todo, "p", args))
        except Exception as exc:  # a worker that died would leave its share to the other
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(ran) == sorted(name for name, _ in todo)  # every point, once
    assert failed == ["p-r3-s0"]
    assert engine.take_points(todo, "p", args) == [] and len(ran) == len(todo)  # nothing left


def test_a_worker_that_loses_the_race_to_make_a_new_storage_waits_for_the_winner(
    tmp_path, monkeypatch
):
    """Workers started together on a storage nobody has used all make its tables; the losers
    fail on "already exists" for as long as the winner is still making them (a few tables, one
    after another). A loser waits and looks again rather than dying: a worker that died this
    way left its share to the others in CI."""
    import time

    import optuna
    import sqlalchemy

    real, tries = optuna.storages.RDBStorage, []
    winner_done = time.monotonic() + 0.3  # seconds the winner takes over its tables

    def racing(url, **kwargs):
        tries.append(time.monotonic())
        if time.monotonic() < winner_done:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE trials", {}, Exception("table trials already exists")
            )
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = engine.storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert storage.get_all_studies() == [] and len(tries) >= 2
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other error is the user's to see, at once
        engine.storage_for(f"sqlite:///{tmp_path / 'other.db'}")


def test_a_point_taken_is_seen_even_when_it_became_visible_late(tmp_path):
    """On a database server two workers' trials can commit out of order: a worker that has
    already seen a higher-numbered trial finish has Optuna's cache skip every lower one from
    then on. The points taken are read from the database itself, so such a point is still
    seen as taken (the cause of a point run twice under load)."""
    import optuna

    storage = engine.storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    mine = optuna.create_study(study_name="g", storage=storage)
    study_id = storage.get_study_id_from_name("g")
    experiment = optuna.distributions.CategoricalDistribution(["a", "b"])
    late = mine.ask({"experiment": experiment})  # the other worker's point, committed late:
    mine.get_trials(deepcopy=False)
    cache = mine._storage._studies[study_id]  # this worker's cache has already gone past it
    cache.unfinished_trial_ids.discard(late._trial_id)
    cache.trials.pop(late.number)
    cache.last_finished_trial_id = late._trial_id
    point = late.params["experiment"]
    assert point not in {t.params.get("experiment") for t in mine.get_trials()}  # the cache's view
    assert engine.points_taken(storage, study_id) == {point: late.number}


def test_a_search_that_draws_its_epochs_prunes_within_the_most_it_may_draw(tmp_path):
    """The pruner's budget is train.epochs: of the regime, or the largest the space may draw
    (finetune-cpu-search draws it); a search with neither is one line."""
    assert engine.pruner_args(plans.load("finetune-cpu-search"), {})["epochs"] == 15
    assert engine.pruner_args(plans.load("finetune-cpu-search"), {"train.epochs": 4})["epochs"] == 4
    assert engine.pruner_args(plans.load("joint"), {})["epochs"] == 60
    (tmp_path / "no-epochs.yaml").write_text("space:\n  train.lr: {log_uniform: [0.01, 0.1]}\n")
    with pytest.raises(ParamsError, match="sets train.epochs in its regime or its space"):
        engine.pruner_args(plans.load(tmp_path / "no-epochs.yaml"), {})
