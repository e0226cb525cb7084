"""The sweep command: its grid, names, checks and shards; the queue's progress lines; two shards
on two clones against one tracking server; an experiment that fails inside a stage."""

from __future__ import annotations

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
from stages.experiments import dvcqueue, sweep, sweepgrid

BIN = Path(sys.executable).parent  # the venv's: dvc, and the `python` that DVC's stages call


def grid(tmp_path, monkeypatch, text: str) -> sweep.Sweep:
    monkeypatch.setattr(sweepgrid, "GRIDS_DIR", tmp_path)
    (tmp_path / "g.yaml").write_text(text)
    return sweep.load("g")


def test_the_committed_grid_makes_the_first_pass_names_and_valid_params():
    s = sweep.load("sweep")
    todo = sweep.points(s, list(s.techniques), [0, 1])
    names = [name for name, _ in todo]
    # the names the first pass ran under (f"{value:g}")
    assert names[:3] == ["sweep-baseline-s0", "sweep-l1-1e-05-s0", "sweep-l1-0.0001-s0"]
    assert "sweep-l2-0.0001-s0" in names and "sweep-dropout-0.5-s1" in names
    assert names.index("sweep-baseline-s1") == len(names) // 2  # seed by seed
    assert len(set(names)) == len(names)
    changes = dict(todo)["sweep-early-stopping-20-s1"]
    assert changes["train.early_stopping.enabled"] is True and changes["seed"] == 1
    assert changes["train.early_stopping.patience"] == 20 and changes["train.epochs"] == 60
    sweep.check(todo, P.read_yaml())  # every point is valid params


def test_labels():
    assert [sweep.label(v) for v in (1e-05, 0.0001, 0.5, 3, None, True, False)] == [
        "1e-05",
        "0.0001",
        "0.5",
        "3",
        "none",
        "true",
        "false",
    ]


def test_points_and_no_baseline_make_a_learning_curve(tmp_path, monkeypatch):
    s = grid(
        tmp_path,
        monkeypatch,
        "baseline: false\nseeds: [3]\ntechniques:\n"
        "  plain: {param: data.train_size, scale: log, points: [\n"
        "    {data.train_size: 1000, train.epochs: 40}, {data.train_size: null, train.epochs: 10}]}\n",
    )
    assert sweep.points(s, ["plain"], [3], "lc", {"train.lr": 0.1}) == [
        (
            "lc-plain-1000-s3",
            {"data.train_size": 1000, "train.epochs": 40, "seed": 3, "train.lr": 0.1},
        ),
        (
            "lc-plain-none-s3",
            {"data.train_size": None, "train.epochs": 10, "seed": 3, "train.lr": 0.1},
        ),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("techniques:\n  l2: {param: train.l2, values: []}\n", "technique 'l2': no values"),
        ("techniques: {}\n", "at least one technique"),
        ("techniques:\n  a: {param: x, values: [1]}\nrowz: 1\n", "unknown: rowz"),
        (
            "techniques:\n  a: {param: x, values: [1], points: [{x: 1}]}\n",
            "either values or points",
        ),
        ("techniques:\n  a: {param: x, points: [{y: 1}]}\n", "every point must set x"),
        ("techniques:\n  a: {values: [1]}\n", "expected {param, values | points"),
    ],
)
def test_a_bad_grid_is_refused_with_one_line(tmp_path, monkeypatch, text, message):
    with pytest.raises(ParamsError) as err:
        grid(tmp_path, monkeypatch, text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_technique_or_a_refused_strength_is_named(tmp_path, monkeypatch):
    s = grid(tmp_path, monkeypatch, "techniques:\n  l2: {param: train.l2, values: [1e-4, -1]}\n")
    with pytest.raises(ParamsError, match="unknown technique l3; the grid has: l2"):
        sweep.select(s, "l2,l3")
    with pytest.raises(ParamsError) as err:
        sweep.check(sweep.points(s, ["l2"], [0]), P.read_yaml())
    assert str(err.value).startswith("sweep-l2--1-s0: params.yaml: train.l2 = -1")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 40])
def test_shards_cover_every_point_exactly_once(n):
    s = sweep.load("sweep")
    todo = sweep.points(s, list(s.techniques), [0, 1, 2])
    parts = [sweep.shard(todo, f"{i}/{n}") for i in range(1, n + 1)]
    names = [name for part in parts for name, _ in part]
    assert sorted(names) == sorted(name for name, _ in todo)  # the union, each once
    assert len(names) == len(set(names))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sweep.shard(todo, f"1/{n}") == sweep.shard(todo, f"1/{n}")  # deterministic


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused(spec):
    with pytest.raises(ParamsError, match="expected i/n"):
        sweep.shard([1, 2], spec)


def test_the_sweep_refuses_uncommitted_params_and_unknown_techniques(tmp_path):
    """Points are built from the committed params.yaml; both errors are one line, before any
    experiment is queued (no DVC repository here: queueing would fail loudly)."""
    write_params(tmp_path)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "stages.experiments.sweep", "run", *a],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    result = run("--techniques", "l2,l3")
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error (sweep): unknown technique l3; the grid has: "
        + ", ".join(sweep.load("sweep").techniques)
    ]
    write_params(tmp_path, **{"model.dropout": 0.3})
    result = run()
    assert result.returncode == 1 and result.stderr.startswith(
        "error (sweep): params.yaml has uncommitted changes (model.dropout=0.3)"
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


@pytest.mark.parametrize("why", [ParamsError("no finished run"), MlflowException("server down")])
def test_a_report_that_cannot_be_built_is_one_line(monkeypatch, capsys, why):
    import stages.experiments.path as path

    def fail(**kwargs):
        raise why

    monkeypatch.setattr(path, "build", fail)
    assert sweep.report("tiny", "p") is False
    assert capsys.readouterr().out == f"sweep: no report: {why}\n"


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
    (origin / "stages/experiments/grids/tiny.yaml").write_text(TINY_GRID)
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
    cmd = [sys.executable, "-m", "stages.experiments.sweep", "run", "--grid", "tiny"]
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
    names = ["sweep-baseline-s0", "sweep-dropout-0.5-s0"]
    # a progress line per experiment, on the machine that ran it
    assert "sweep: [1/1] sweep-baseline-s0: test accuracy" in outs[0][0]
    assert "sweep: [1/1] sweep-dropout-0.5-s0: test accuracy" in outs[1][0]

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
    cmd = [sys.executable, "-m", "stages.experiments.sweep", "report", "--grid", "tiny"]
    result = sh(root / "a", *cmd, env={"MLFLOW_TRACKING_URI": server.uri})
    assert result.returncode == 0, result.stdout + result.stderr
    text = (root / "a/reports/sweep-path.md").read_text()
    assert "dropout" in text and "baseline" in text
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.prefix` = 'sweep'")
    assert len(runs) == 1, "the two machines' reports made two parent runs"
    query = "tags.`dvc.exp_name` LIKE 'sweep-%'"
    children = client.search_runs([experiment.experiment_id], query)
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {runs[0].info.run_id}


def test_an_experiment_failing_inside_a_stage_is_named_and_exits_non_zero(team):
    """A wrong data.sha256 is valid params (64 hex digits): only the download stage, comparing
    it with the archive's, finds it wrong."""
    root, server = team
    result = sh(
        root / "a",
        sys.executable,
        "-m",
        "stages.experiments.sweep",
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
    assert "sweep: [1/1] bad-baseline-s0 FAILED: error (download)" in result.stdout
    assert "report" in result.stdout  # the report of what finished is still attempted
    assert result.stderr.strip().splitlines()[-1] == (
        "error (sweep): 1 experiment(s) failed: bad-baseline-s0"
    )
    assert "Traceback" not in result.stderr
