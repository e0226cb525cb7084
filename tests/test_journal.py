"""A machine without MLflow: the stages journal their run (tracking URI journal:<folder>), and one
command replays the journal into MLflow, once; the engine without DVC and the GPU check run the
stages' own code that way."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    EPOCHS,
    REPO,
    TINY,
    copy_repo,
    finish,
    run_stage,
    start_train,
    wait_for_checkpoint,
    write_params,
)
from mlflow.tracking import MlflowClient

from stages import augment, download

# train and evaluate in one process, as a GPU machine runs them; then: did anything load mlflow?
STAGES = (
    "import sys\n"
    "from stages import evaluate, train\n"
    "train.main()\n"
    "evaluate.main()\n"
    "print('mlflow imported:', 'mlflow' in sys.modules)\n"
)


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result


def journal_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()]


def history(lines: list[dict], metric: str) -> list[tuple[int, float]]:
    return [
        (line["step"], line["metrics"][metric])
        for line in lines
        if line["kind"] == "metrics" and metric in line["metrics"]
    ]


def test_a_journaled_run_replays_into_mlflow_once_with_what_mlflow_would_have(workdir):
    download.main()
    augment.main()
    # The same pipeline logged to MLflow directly, for comparison.
    direct_uri = f"sqlite:///{workdir / 'direct.db'}"
    for stage in ("train", "evaluate"):
        assert run_stage(stage, workdir, {"MLFLOW_TRACKING_URI": direct_uri}).returncode == 0
    direct_model = (workdir / "models/model.pt").read_bytes()

    journaled = run(
        [sys.executable, "-c", STAGES],
        workdir,
        {"MLFLOW_TRACKING_URI": "journal:journal", "DVC_EXP_NAME": "exp-1"},
    )
    assert "mlflow imported: False" in journaled.stdout
    assert (
        workdir / "models/model.pt"
    ).read_bytes() == direct_model  # where it logs changes nothing

    (folder,) = (workdir / "journal").iterdir()  # a relative folder: under the repository root
    assert json.loads((workdir / "models/run.json").read_text())["run_id"] == folder.name
    lines = journal_lines(folder)
    assert [line["kind"] for line in lines[:2]] == ["start", "params"]
    assert lines[0]["run_name"] == "exp-1" and lines[0]["experiment"] == "overfitting"
    ends = [line["status"] for line in lines if line["kind"] == "end"]
    assert ends == ["FINISHED", "FINISHED"] and lines[-1]["kind"] == "end"  # train's, evaluate's
    assert [step for step, _ in history(lines, "val_accuracy")] == [1, 2]
    for line in lines:
        if line["kind"] in ("artifact", "model"):
            assert (folder / (line.get("file") or line["checkpoint"])).is_file()
    test_accuracy = json.loads((workdir / "metrics/eval.json").read_text())["test_accuracy"]
    assert history(lines, "test_accuracy") == [(None, test_accuracy)]
    summary = run(
        [sys.executable, "-m", "stages.tracking.summary"],
        workdir,
        {"MLFLOW_TRACKING_URI": "journal:journal"},
    )
    assert f"python -m stages.tracking.replay {workdir.resolve() / 'journal'}" in summary.stdout

    # A replay cut short before: its run is replaced, not kept beside the new one.
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    cut_short = client.create_run(
        client.create_experiment("overfitting", artifact_location=(workdir / "mlruns").as_uri()),
        tags={"journal.run_id": folder.name},
    )
    replay = [sys.executable, "-m", "stages.tracking.replay", "journal", "--tracking-uri", uri]
    assert "1 runs replayed" in run(replay, workdir).stdout
    assert client.get_run(cut_short.info.run_id).info.lifecycle_stage == "deleted"

    experiment = client.get_experiment_by_name("overfitting")
    (replayed,) = client.search_runs([experiment.experiment_id])
    run_id = replayed.info.run_id
    assert replayed.info.run_name == "exp-1" and replayed.info.status == "FINISHED"
    assert replayed.data.tags["journal.run_id"] == folder.name
    assert replayed.data.params == lines[1]["params"]
    steps = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy"))
    assert steps == history(lines, "val_accuracy")
    assert replayed.data.metrics["test_accuracy"] == test_accuracy
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"params.yaml", "train.json", "eval.json", "confusion.csv"} <= artifacts
    (model,) = client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert "extra_files" in {f.path for f in client.list_logged_model_artifacts(model.model_id)}

    # What the direct run has, the replayed one has: the same params, metrics and tags.
    (direct,) = MlflowClient(direct_uri).search_runs(
        [MlflowClient(direct_uri).get_experiment_by_name("overfitting").experiment_id]
    )
    assert replayed.data.params == direct.data.params
    assert replayed.data.metrics.keys() == direct.data.metrics.keys()
    assert replayed.data.metrics["final_val_accuracy"] == direct.data.metrics["final_val_accuracy"]
    ours = {k for k in direct.data.tags if not k.startswith("mlflow.")}
    assert ours - {"dvc.exp_name"} <= replayed.data.tags.keys()

    # Again: nothing added.
    assert "0 runs replayed" in run(replay, workdir).stdout
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_killed_journaled_training_resumes_into_the_same_run(prepared):
    env = {"MLFLOW_TRACKING_URI": "journal:journal"}
    proc = start_train(prepared, env)
    wait_for_checkpoint(prepared, 3, proc)
    proc.send_signal(signal.SIGKILL)  # no word in the journal: the run stays open
    proc.wait()
    result = finish(start_train(prepared, env))
    assert result.returncode == 0 and "resuming after epoch" in result.stdout, result.stderr

    (folder,) = (prepared / "journal").iterdir()
    lines = journal_lines(folder)
    assert [step for step, _ in history(lines, "val_accuracy")] == list(range(1, EPOCHS + 1))
    assert [line["status"] for line in lines if line["kind"] == "end"] == ["FINISHED"]


def test_a_journal_folder_that_is_not_there_is_one_line(workdir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.tracking.replay",
            "nowhere",
            "--tracking-uri",
            "sqlite:///x.db",
        ],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error (tracking): nowhere: no such folder"


@pytest.fixture
def tiny_repo(tmp_path, pickle_archive) -> Path:
    """A copy of the repository whose params.yaml points at the tiny data set."""
    repo = copy_repo(tmp_path / "repo")
    write_params(repo, **{"data.source": str(pickle_archive), **TINY})
    return repo


def blocking(folder: Path, *packages: str) -> Path:
    """A folder to put first on PYTHONPATH: importing any of `packages` from it fails, as on a
    machine that has only PyTorch."""
    for package in packages:
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text(
            f"raise ImportError('{package} is not on this machine')\n"
        )
    return folder


def test_the_engine_without_dvc_runs_a_grid_journals_it_and_reports_from_the_journal(
    tiny_repo, tmp_path
):
    (tiny_repo / "stages/experiments/plans/tiny.yaml").write_text(
        "baseline: true\nregime: {train.epochs: 1}\nseeds: [0]\n"
        "techniques:\n  dropout: {param: model.dropout, values: [0.5], scale: linear}\n"
    )
    names = {"t-baseline-s0", "t-dropout-0.5-s0"}
    engine = [sys.executable, "-m", "stages.experiments.engine"]
    grid = ["--grid", "tiny", "--prefix", "t", "--without-dvc"]
    no_mlflow = {"PYTHONPATH": str(blocking(tmp_path / "blocked", "mlflow", "dvc"))}
    out = run([*engine, "run", *grid, "--jobs", "2"], tiny_repo, no_mlflow).stdout
    assert "engine: 2 experiments, 2 worker(s)" in out
    assert all(f"engine: {name}: test " in out for name in names), out
    folders = tiny_repo / "data/without-dvc/t"
    journal = folders / "journal"
    assert len(list(journal.iterdir())) == 2
    report = tiny_repo / "reports/t-path.md"
    assert "Built from 2 finished runs." in report.read_text()

    # Again: the finished ones are skipped; the report alone is written from the journal.
    again = run([*engine, "run", *grid, "--jobs", "2"], tiny_repo, no_mlflow).stdout
    assert "2 experiments finished before (journal): skipped" in again
    assert "engine: 0 experiments" in again and len(list(journal.iterdir())) == 2
    report.unlink()
    run([*engine, "report", *grid], tiny_repo, no_mlflow)
    assert "Built from 2 finished runs." in report.read_text()

    uri = f"sqlite:///{tiny_repo / 'mlflow.db'}"
    replay = [sys.executable, "-m", "stages.tracking.replay", str(journal), "--tracking-uri", uri]
    assert "2 runs replayed" in run(replay, tiny_repo, {"PYTHONPATH": ""}).stdout
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("overfitting").experiment_id])
    assert {r.info.run_name for r in found} == names
    assert {r.data.tags["dvc.exp_name"] for r in found} == names
    for replayed in found:
        evaluated = json.loads((folders / replayed.info.run_name / "metrics/eval.json").read_text())
        assert replayed.data.metrics["test_accuracy"] == evaluated["test_accuracy"]


def test_a_search_without_dvc_reports_its_trials_to_optuna_and_journals_them(tiny_repo, tmp_path):
    """The trials run in folders of their own, each hearing its epochs through its trial handle
    (data/trials/ of its folder), their runs journaled; then the best recipe's rerun, the report."""
    import optuna

    (tiny_repo / "stages/experiments/plans/space.yaml").write_text(
        "regime: {train.epochs: 2}\nseeds: [0]\n"
        "search: {seed: 3, pruner: hyperband, seeds_of_the_best: [0, 1]}\n"
        "space:\n  model.dropout: {uniform: [0.0, 0.5]}\n"
    )
    cmd = [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "space"]
    cmd += ["--without-dvc", "--trials", "2", "--jobs", "2"]
    run(cmd, tiny_repo, {"PYTHONPATH": str(blocking(tmp_path / "blocked", "mlflow", "dvc"))})
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{tiny_repo / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    assert all(t.intermediate_values for t in study.trials)  # the epochs reached the trials
    best = study.best_trial.number
    journal = tiny_repo / "data/without-dvc/space/journal"
    named = {journal_lines(folder)[0]["run_name"] for folder in journal.iterdir()}
    assert named == {"space-t0", "space-t1", f"space-t{best}-s1"}
    assert "## The best trial: space-t" in (tiny_repo / "reports/space-search.md").read_text()


def test_the_journal_reader_gives_finished_runs_as_the_reports_read_them(tmp_path):
    """A study's table from journaled runs: each metric's latest value, the run's minutes, and
    neither a run still open nor one of another prefix."""
    from stages.experiments import plan as plans
    from stages.experiments.reports import table
    from stages.tracking import journal

    uri = f"journal:{tmp_path / 'journal'}"
    for name, test, ended in (("p-a-s0", 0.4, True), ("p-a-s1", 0.5, True), ("p-a-s2", 0.9, False)):
        run = journal.start(uri, "overfitting", name, {"dvc.exp_name": name}, {"seed": name[-1]})
        for epoch in (1, 2):
            run.log_metrics({"val_accuracy": epoch / 10}, epoch, journal.now())
        finals = {"final_train_accuracy": 0.9, "final_epochs_run": 2, "test_accuracy": test}
        run.log_metrics({**finals, "generalization_gap": 0.9 - test}, None, journal.now())
        if ended:
            run.write({"kind": "end", "status": "FINISHED", "time": journal.now() + 60000})
    other = journal.start(uri, "overfitting", "q-a-s0", {"dvc.exp_name": "q-a-s0"}, {})
    other.write({"kind": "end", "status": "FINISHED", "time": journal.now()})

    runs = {r.info.run_name: r for r in journal.Reader(uri).runs("overfitting", "p")}
    assert runs["p-a-s0"].data.metrics["val_accuracy"] == 0.2  # the latest epoch's
    assert runs["p-a-s2"].info.status == "RUNNING" and runs["p-a-s1"].data.params == {"seed": "1"}
    plan = plans.Plan("tiny", "rows", "p", {}, (0, 1, 2), {"a": {"model.dropout": 0.5}})
    out = table.build(plan, "p", out_dir=tmp_path, tracking_uri=uri, experiment="overfitting")
    text = out.read_text()
    assert "| a | model.dropout=0.5 | 2 | 90.0 ± 0.0% | 45.0 ± 7.1% |" in text, text
    assert "| 2 | 1.0 |" in text and "Built from 2 finished runs." in text


def test_the_engine_without_dvc_refuses_a_journal_without_the_mode(tiny_repo):
    result = subprocess.run(
        [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "learning-curve"]
        + ["--journal", "somewhere"],
        cwd=tiny_repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error (engine): --journal goes with --without-dvc (DVC experiments log to MLflow)"
    )


def test_the_gpu_check_trains_through_the_train_stage(tiny_repo):
    run(
        [sys.executable, "benchmarks/gpu.py", "--runs", "2", "--epochs", "1", "--skip", "net"]
        + ["--device", "cpu", "--out", "gpu.json"],
        tiny_repo,
        {"PYTHONPATH": ""},
    )
    result = json.loads((tiny_repo / "gpu.json").read_text())
    first, second = result["preset"]["runs"]
    assert len(first["train_seconds_per_epoch"]) == 1 and 0 <= first["test_accuracy"] <= 1
    assert second["max_weight_difference_to_run_1"] == 0.0
    assert {p.name for p in (tiny_repo / "data/gpu-bench/journal").iterdir()} == {
        first["run_id"],
        second["run_id"],
    }


def test_nothing_replaces_another_modules_attributes_at_run_time():
    """A seam (an interface passed in, a tracking URI) instead: no `module.name = …` or
    setattr(module, …) on an imported module in stages/ or benchmarks/."""
    found = []
    for path in sorted([*(REPO / "stages").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                owners = [node.args[0]]
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                owners = [t.value for t in targets if isinstance(t, ast.Attribute)]
            else:
                continue
            for owner in owners:
                base = owner
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in imported:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(owner)}")
    assert not found, found


def test_the_committed_gpu_records_replay_into_mlflow_once(tiny_repo):
    """reports/gpu/*-runs.json predate the journal: journaled as runs of what they hold."""
    records = json.loads((tiny_repo / "reports/gpu/net-runs.json").read_text())
    uri = f"sqlite:///{tiny_repo / 'mlflow.db'}"
    replay = [sys.executable, "-m", "stages.tracking.replay", "data/without-dvc/net/journal"]
    replay += ["--records", "reports/gpu/net-runs.json", "--tracking-uri", uri]
    env = {"PYTHONPATH": ""}
    first = run(replay, tiny_repo, env).stdout
    assert f"{len(records)} records journaled" in first
    assert f"{len(records)} runs replayed" in first
    again = run(replay, tiny_repo, env).stdout
    assert "0 records journaled" in again and "0 runs replayed" in again
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("overfitting").experiment_id])
    by_name = {r.info.run_name: r for r in found}
    assert by_name.keys() == {r["name"] for r in records}
    for record in records:
        replayed = by_name[record["name"]].data
        assert replayed.params == record["params"]
        assert replayed.metrics["test_accuracy"] == record["evaluate"]["test_accuracy"]
        assert replayed.metrics["final_val_accuracy"] == record["train"]["val_accuracy"]
        assert replayed.tags["journal.record"] == "net-runs.json"
