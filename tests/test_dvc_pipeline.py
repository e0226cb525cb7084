"""The whole pipeline through DVC, in a scratch git repository made from this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import TINY, copy_repo, write_params
from mlflow.tracking import MlflowClient

from stages import io as sio
from stages.experiments import dvcqueue, plan as plans

BIN = Path(sys.executable).parent  # the venv's: dvc, and the `python` that DVC's stages call


def sh(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    return result


def ok(repo: Path, *cmd: str) -> str:
    result = sh(repo, *cmd)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def runs(repo: Path):
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("overfitting")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory, pickle_archive) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("clone"))
    write_params(repo, **{"data.source": str(pickle_archive), **TINY})
    ok(repo, "git", "init", "-q", "-b", "main")
    ok(repo, "git", "config", "user.email", "test@example.com")
    ok(repo, "git", "config", "user.name", "test")
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-q", "-m", "tiny data")
    return repo


def test_repro_runs_every_stage_into_one_mlflow_run(repo):
    out = ok(repo, "dvc", "repro")
    for stage in ("check", "download", "augment", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    for path in (
        "data/params.ok",
        "data/raw/train_images.npy",
        "data/prepared/val_labels.npy",
        "models/model.pt",
        "metrics/train.json",
        "metrics/eval.json",
        "reports/confusion.png",
        "reports/augment_preview.png",
        "reports/wise.png",  # a note that WiSE-FT is off: DVC expects every out
        "dvc.lock",
    ):
        assert (repo / path).exists(), path
    (run,) = runs(repo)
    assert "test_accuracy" in run.data.metrics and run.data.params["train.lr"] == "0.01"
    # no DVC params of train (they rerun nothing), but logged all the same
    assert run.data.params["mlflow.experiment"] == "overfitting"
    assert run.data.params["train.feature_cache"] == "True"
    assert run.data.tags["git.commit"] == ok(repo, "git", "rev-parse", "HEAD").strip()
    assert run.data.tags["git.dirty"] == "false"  # params.yaml as committed
    # The store and its artifacts are neither in git's nor in DVC's view.
    status = ok(repo, "git", "status", "--porcelain", "--ignored")
    assert "!! mlflow.db" in status and "!! mlruns/" in status
    assert ok(repo, "dvc", "check-ignore", "mlflow.db", "mlruns").split() == ["mlflow.db", "mlruns"]


def test_second_repro_does_nothing(repo):
    out = ok(repo, "dvc", "repro")
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out
    assert len(runs(repo)) == 1
    assert ok(repo, "dvc", "status").strip() == "Data and pipelines are up to date."


def test_a_fresh_clone_pulls_from_the_remote_and_has_nothing_to_repro(repo, tmp_path):
    """A local-folder remote; S3, GCS or SSH remotes are the same commands with another URL."""
    ok(repo, "dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    pushed = ok(repo, "dvc", "push")
    assert "pushed" in pushed
    ok(repo, "git", "add", "-A")  # dvc.lock, .dvc/config, the metrics and plots DVC doesn't cache
    ok(repo, "git", "commit", "-q", "-m", "results, and where their data live")

    clone = tmp_path / "clone"
    ok(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/model.pt").exists() and not (clone / "data/raw").exists()
    ok(clone, "dvc", "pull")
    for path in (
        "models/model.pt",
        "data/raw/train_images.npy",
        "data/prepared/train_images.npy",
        "data/params.ok",
    ):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert ok(clone, "dvc", "status").strip() == "Data and pipelines are up to date."
    out = ok(clone, "dvc", "repro")
    assert "Running stage" not in out and "Data and pipelines are up to date" in out
    assert not (clone / "mlflow.db").exists()  # nothing ran, so nothing was logged


def test_each_stage_reruns_only_for_the_params_it_reads(repo):
    import yaml

    original = (repo / "params.yaml").read_text()
    try:
        for key, value, stages in [
            ("augment.online", True, {"train"}),
            ("augment.copies", 1, {"augment"}),
            ("augment.flip", True, {"augment", "train"}),
            ("evaluate.max_gap", 0.2, {"evaluate"}),
            ("data.image_size", 40, {"download"}),
            # where the run is logged, how the frozen prefix is computed: no stage reruns
            ("mlflow.experiment", "elsewhere", set()),
            ("mlflow.tracking_uri", "sqlite:///elsewhere.db", set()),
            ("train.feature_cache", False, set()),
        ]:
            section, name = key.split(".")
            params = yaml.safe_load(original)
            params[section][name] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(params))
            changed = set(json.loads(ok(repo, "dvc", "status", "--json")))
            assert changed == {"check", *stages}, key  # check validates all of params.yaml
    finally:
        (repo / "params.yaml").write_text(original)


def test_going_back_to_params_that_ran_restores_instead_of_retraining(repo):
    """A, then B, then A again: DVC's run cache restores A's outputs (every out is cached), so
    nothing trains, the bytes are A's, and models/run.json still names A's MLflow run."""
    outputs = (
        "reports/augment_preview.png",
        "models/model.pt",
        "models/run.json",
        "reports/train_curves.png",
        "metrics/train.json",
        "metrics/eval.json",
        "reports/confusion.png",
    )
    original = (repo / "params.yaml").read_text()
    ok(repo, "dvc", "repro")  # A: the module's earlier tests ran it already
    a = {path: (repo / path).read_bytes() for path in outputs}
    before = len(runs(repo))
    try:
        write_params_text(repo, original, {"augment.flip": True})  # B: augment, train, evaluate
        out = ok(repo, "dvc", "repro")
        assert "Running stage 'train'" in out and len(runs(repo)) == before + 1
    finally:
        (repo / "params.yaml").write_text(original)
    out = ok(repo, "dvc", "repro")  # A again
    for stage in ("augment", "train", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run" in out, out
    assert "Running stage" not in out.replace("Running stage 'check'", "")
    assert {path: (repo / path).read_bytes() for path in outputs} == a
    assert len(runs(repo)) == before + 1  # a restore logs no run


def write_params_text(repo: Path, text: str, changes: dict) -> None:
    import yaml

    params = yaml.safe_load(text)
    for key, value in changes.items():
        section, name = key.split(".")
        params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_dvc_metrics_and_plots_read_the_outputs(repo):
    metrics = json.loads(ok(repo, "dvc", "metrics", "show", "--json"))
    flat = json.dumps(metrics)
    assert "test_accuracy" in flat and "val_accuracy" in flat and "generalization_gap" in flat
    ok(repo, "dvc", "plots", "show", "-o", str(repo / "plots-html"))
    assert (repo / "plots-html" / "index.html").exists()


def test_exp_run_with_a_param_adds_a_second_run(repo):
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-q", "--allow-empty", "-m", "baseline results")
    out = ok(repo, "dvc", "exp", "run", "-S", "train.lr=0.02")
    assert "Running stage 'train'" in out and "Running stage 'download'" not in out
    second = runs(repo)[-1]  # the newest: earlier tests ran A and B before it
    assert second.data.params["train.lr"] == "0.02"
    names = ok(repo, "dvc", "exp", "list", "--name-only").split()
    assert second.info.run_name in names
    assert second.data.tags["dvc.exp_name"] == second.info.run_name
    assert second.data.tags["dvc.baseline_rev"] == ok(repo, "git", "rev-parse", "HEAD").strip()
    assert second.data.tags["git.dirty"] == "true"  # DVC changed params.yaml for the experiment
    assert "test_accuracy" in second.data.metrics


@pytest.mark.parametrize(
    "override, message",
    [
        ("+train.lrr=0.1", "unknown key 'train.lrr'"),  # '+' adds a key; without it DVC refuses
        ("train.lr=-1", "train.lr = -1: Input should be greater than 0"),
        ("data.val_fraction=1.5", "data.val_fraction = 1.5: Input should be less than 1"),
        ("data.image_size=64", "data.image_size = 64: net takes 32…32 pixels"),  # before download
    ],
)
def test_bad_params_stop_before_any_output_is_touched(repo, override, message):
    outputs = [
        "data/raw/train_images.npy",
        "data/prepared/train_images.npy",
        "models/model.pt",
        "metrics/train.json",
        "metrics/eval.json",
    ]
    before = {path: (repo / path).read_bytes() for path in outputs}
    result = sh(repo, "dvc", "exp", "run", "-S", override)
    assert result.returncode != 0
    assert f"error (check): params.yaml: {message}" in result.stderr + result.stdout
    assert (
        "Running stage 'train'" not in result.stdout
        and "Running stage 'download'" not in result.stdout
    )
    for path, data in before.items():
        assert (repo / path).read_bytes() == data, path
    ok(repo, "git", "checkout", "params.yaml")


def test_dvc_itself_refuses_a_plain_typo(repo):
    result = sh(repo, "dvc", "exp", "run", "-S", "train.lrr=0.1")
    assert result.returncode != 0 and "Could not override 'train.lrr'" in result.stderr


def test_the_study_command_runs_a_parallel_queue_and_reports_every_run(repo, pickle_archive):
    """`make study`'s command (the engine on the study's plan) on tiny data, two workers: every
    run lands complete in MLflow, the runs overlap in time, and the table and the comparison
    report hold every run. Two rows, one per worker: that is all the overlap needs."""
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-q", "--allow-empty", "-m", "before the queue")
    rows = ["baseline", "dropout"]
    try:
        out = ok(
            repo,
            "python",
            "-m",
            "stages.experiments.engine",
            "run",
            "--grid",
            "regularization",
            "--rows",
            ",".join(rows),
            "--seeds",
            "0",
            "--jobs",
            "2",
            "--prefix",
            "tiny",
            "--set",
            "train.epochs=3",
            "--set",
            "data.train_size=null",
        )
    finally:
        sh(repo, "dvc", "queue", "stop", "--kill")
    assert "Failed" not in ok(repo, "dvc", "queue", "status")

    names = [f"tiny-{row}-s0" for row in rows]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    by_name = {r.data.tags.get("dvc.exp_name"): r for r in runs(repo)}
    head = ok(repo, "git", "rev-parse", "HEAD").strip()
    for row, name in zip(rows, names):
        run = by_name[name]
        assert run.info.run_name == name and run.info.status == "FINISHED"
        extra = {"train.epochs": 3, "data.train_size": None}
        [(_, expected)] = plans.experiments(plans.load("regularization"), [row], [0], "tiny", extra)
        for key, value in expected.items():
            assert run.data.params[key] == str(value), key
        assert run.data.tags["dvc.baseline_rev"] == head
        assert run.data.tags["data.sha256"] == sio.sha256_of(pickle_archive)
        assert len(run.data.tags["params_hash"]) == 16
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [
            1,
            2,
            3,
        ]
        assert "test_accuracy" in run.data.metrics and "verdict" in run.data.tags
    assert len({by_name[n].data.tags["params_hash"] for n in names}) == len(names)
    assert not (repo / "data/mlflow-missed").exists()  # nothing had to be journaled
    threads = [by_name[n].data.metrics["torch_threads"] for n in names]
    cores = len(os.sched_getaffinity(0))
    assert all(t <= cores for t in threads)
    if dvcqueue.workers_that_died_starting(repo):  # DVC's own start-up race (treeverse/dvc-task#73)
        assert "died at start" in out  # said so; the other worker ran every experiment
        warnings.warn(
            "a DVC queue worker died at start: the runs were not parallel this time", stacklevel=1
        )
    else:
        # The two workers really ran at the same time: some two runs overlap (how their
        # trainings share the cores meanwhile: tests/test_sharing.py)
        spans = sorted((by_name[n].info.start_time, by_name[n].info.end_time) for n in names)
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    table = (repo / "reports/tiny-regularization.md").read_text()
    assert (
        all(f"| {row} |" in table for row in rows)
        and "| dropout | model.dropout=0.5 | 1 |" in table
    )
    assert table in out  # printed too
    report = (repo / "reports/tiny-comparison.md").read_text()  # under the pass's prefix
    assert all(f"| {name} |" in report for name in names)

    ok(repo, "dvc", "plots", "diff", names[0], names[1], "-o", str(repo / "plots-diff"))
    html = (repo / "plots-diff" / "index.html").read_text()
    assert names[0] in html and names[1] in html


def test_sigkill_during_repro_then_repro_resumes_bit_identically(repo):
    """DVC deletes a stage's outputs before running it; the checkpoint in data/checkpoints/ is not
    one of them, so the next `dvc repro` resumes and ends with the same bytes."""
    import signal

    import yaml
    from conftest import wait_for_checkpoint

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 20  # tiny epochs: long enough to be killed part-way
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    ok(repo, "dvc", "repro")  # the uninterrupted reference
    outputs = (
        "models/model.pt",
        "metrics/train.json",
        "reports/train_curves.csv",
        "metrics/eval.json",
    )
    expected = {path: (repo / path).read_bytes() for path in outputs}
    before = len(runs(repo))

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    proc = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_checkpoint(repo, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # DVC and the stage it runs, at once
    proc.wait()
    assert not (repo / "models/model.pt").exists()  # DVC had removed the stage's outputs

    # --force: the reference run above left these outputs in DVC's cache, which `dvc repro` would
    # restore; a user's killed training (new params) has no such twin and resumes
    out = ok(repo, "dvc", "repro", "--force", "--downstream", "train")
    assert "Running stage 'train'" in out and "resuming after epoch" in out
    for path, data in expected.items():
        assert (repo / path).read_bytes() == data, path
    assert not list((repo / "data/checkpoints").glob("*.pt"))  # removed once training finished
    resumed = runs(repo)[-1]
    assert len(runs(repo)) == before + 1  # the killed run was continued, not restarted
    history = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_metric_history(
        resumed.info.run_id, "val_accuracy"
    )
    assert (
        sorted(m.step for m in history) == list(range(1, 21)) and resumed.info.status == "FINISHED"
    )
    assert resumed.info.run_id == json.loads((repo / "models/run.json").read_text())["run_id"]
    assert "test_accuracy" in resumed.data.metrics  # evaluate logged into the resumed run
