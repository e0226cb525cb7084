"""The regularization-path report (stages/experiments/reports/path.py), on runs made directly in a
scratch MLflow store (no training)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages import params as P
from stages.errors import ParamsError
from stages.experiments import plan as plans
from stages.experiments.reports import path

T975 = {1: 12.706205, 2: 4.302653}  # Student's t, 97.5% quantile, by degrees of freedom (tables)

# Per seed 0, 1, 2: (train, validation, test) accuracy. 1e-4 is best on validation, 1e-3 on test:
# the report must choose 1e-4.
RUNS = {
    "baseline": [(0.90, 0.40, 0.41), (0.92, 0.42, 0.43), (0.94, 0.44, 0.45)],
    "l2-0.0001": [(0.80, 0.46, 0.42), (0.82, 0.47, 0.43), (0.84, 0.48, 0.44)],
    "l2-0.001": [(0.60, 0.45, 0.49), (0.61, 0.46, 0.52), (0.62, 0.47, 0.55)],
}
STRENGTH = {"baseline": 0.0, "l2-0.0001": 1e-4, "l2-0.001": 1e-3}
GRID = {"regime": {"train.epochs": 30}, "seeds": [0, 1, 2], "techniques": {}}


@pytest.fixture
def mlflow_store(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(
        "overfitting", artifact_location=(tmp_path / "mlruns").as_uri()
    )
    return uri, client, experiment_id


def add_run(client, experiment_id, name, params, train, val, test):
    """A finished run as train + evaluate log it: the DVC experiment's name, params, metrics."""
    run = client.create_run(experiment_id, run_name=name, tags={"dvc.exp_name": name})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    metrics = {
        "final_train_accuracy": train,
        "final_val_accuracy": val,
        "test_accuracy": test,
        "generalization_gap": train - test,
    }
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def write_grid(tmp_path, **grid) -> str:
    file = tmp_path / "grid.yaml"
    file.write_text(
        yaml.safe_dump({**GRID, **grid}, sort_keys=False)
    )  # in order: the first technique counts
    return str(file)


def l2_sweep(tmp_path, store, runs=RUNS, skip=()):
    """The l2 path of RUNS, every run but those named in `skip`; returns the grid's file."""
    _, client, experiment_id = store
    for row, per_seed in runs.items():
        for seed, (train, val, test) in enumerate(per_seed):
            name = f"sw-{row}-s{seed}"
            if name not in skip:
                params = {"train.l2": STRENGTH[row], "seed": seed}
                add_run(client, experiment_id, name, params, train, val, test)
    technique = {"param": "train.l2", "values": [1e-4, 1e-3], "scale": "log"}
    return write_grid(tmp_path, techniques={"l2": technique})


def build(tmp_path, store, grid):
    return path.build(plans.load(grid), "sw", tmp_path / "reports", store[0], "overfitting")


def row(report: str, first_cell: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def interval(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences, by hand."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return f"{mean:+.1f} pt [{mean - half:+.1f}, {mean + half:+.1f}]"


def test_table_means_paired_differences_and_intervals(tmp_path, mlflow_store):
    report = build(tmp_path, mlflow_store, l2_sweep(tmp_path, mlflow_store))
    text = report.read_text()
    assert report == tmp_path / "reports/sw-path.md"
    assert row(text, "baseline (none)") == [
        "baseline (none)",
        "3",
        "92.0 ± 2.0%",
        "42.0 ± 2.0%",
        "43.0 ± 2.0%",
        "49.0 ± 0.0 pt",
        "—",
        "—",
        "reference",
    ]
    # 1e-4: Δtest per seed +1, 0, −1 (within noise); Δgap −11, −10, −9.
    assert row(text, "**0.0001 ✓**") == [
        "**0.0001 ✓**",
        "3",
        "82.0 ± 2.0%",
        "47.0 ± 1.0%",
        "43.0 ± 1.0%",
        "39.0 ± 1.0 pt",
        interval([1, 0, -1]),
        interval([-11, -10, -9]),
        "within noise",
    ]
    assert interval([1, 0, -1]) == "+0.0 pt [-2.5, +2.5]"
    # 1e-3: Δtest +8, +9, +10 (helps, and the best on test, yet not chosen); Δgap −38, −40, −42.
    assert row(text, "0.001") == [
        "0.001",
        "3",
        "61.0 ± 1.0%",
        "46.0 ± 1.0%",
        "52.0 ± 3.0%",
        "9.0 ± 2.0 pt",
        interval([8, 9, 10]),
        interval([-38, -40, -42]),
        "helps",
    ]
    assert "Chosen on validation: train.l2 = 0.0001 (validation 47.0%, test 43.0%" in text


def test_the_validation_best_strength_is_chosen_not_the_test_best(tmp_path, mlflow_store):
    build(tmp_path, mlflow_store, l2_sweep(tmp_path, mlflow_store))
    chosen = json.loads((tmp_path / "reports/sw-chosen.json").read_text())
    assert chosen == {
        "l2": {
            "param": "train.l2",
            "value": 1e-4,
            "baseline": False,
            "changes": {"train.l2": 1e-4},
            "val_accuracy": pytest.approx(0.47),
            "test_accuracy": pytest.approx(0.43),
            "seeds": [0, 1, 2],
        }
    }


def test_when_the_baseline_wins_on_validation_the_report_says_so(tmp_path, mlflow_store):
    worse = {  # every strength below the baseline on validation
        row: [(tr, va - (0.1 if row != "baseline" else 0), te) for tr, va, te in per_seed]
        for row, per_seed in RUNS.items()
    }
    build(tmp_path, mlflow_store, l2_sweep(tmp_path, mlflow_store, runs=worse))
    text = (tmp_path / "reports/sw-path.md").read_text()
    assert "none of these strengths beats no regularization on validation" in text
    assert row(text, "**baseline (none) ✓**")[0] == "**baseline (none) ✓**"
    chosen = json.loads((tmp_path / "reports/sw-chosen.json").read_text())["l2"]
    assert chosen["baseline"] is True and chosen["value"] == 0.0 and chosen["changes"] == {}


def test_a_path_around_a_tuned_recipe_names_the_regimes_strength_as_its_baseline(
    tmp_path, mlflow_store
):
    """A path whose regime already sets the technique's param (a searched recipe, say): its
    baseline is that strength, not "none", and a baseline chosen on validation says so."""
    worse = {
        row: [(tr, va - (0.1 if row != "baseline" else 0), te) for tr, va, te in per_seed]
        for row, per_seed in RUNS.items()
    }
    grid = l2_sweep(tmp_path, mlflow_store, runs=worse)
    spec = yaml.safe_load(open(grid))
    spec["regime"]["train.l2"] = 1e-5
    open(grid, "w").write(yaml.safe_dump(spec, sort_keys=False))
    text = build(tmp_path, mlflow_store, grid).read_text()
    assert row(text, "**baseline (1e-05) ✓**")[0] == "**baseline (1e-05) ✓**"
    assert "baseline (none)" not in text
    assert "none of these strengths beats the regime's train.l2 = 1e-05 on validation" in text


def test_the_report_shows_only_the_techniques_that_ran(tmp_path, mlflow_store):
    """Issue 28: a quick pass of two techniques listed the ten others as 'No finished runs'."""
    l2_sweep(tmp_path, mlflow_store)
    dropout = {"param": "model.dropout", "values": [0.5], "scale": "linear"}
    l2 = {"param": "train.l2", "values": [1e-4, 1e-3], "scale": "log"}
    grid = write_grid(tmp_path, techniques={"dropout": dropout, "l2": l2})
    text = build(tmp_path, mlflow_store, grid).read_text()
    assert "## l2 (`train.l2`)" in text
    assert "dropout" not in text and "No finished runs" not in text
    assert "Built from 9 finished runs." in text
    assert not (tmp_path / "reports/sw-path-dropout.png").exists()


def test_a_committed_report_is_kept_when_the_new_one_has_fewer_runs(tmp_path, mlflow_store):
    import subprocess

    grid = l2_sweep(tmp_path, mlflow_store)
    report = build(tmp_path, mlflow_store, grid)
    full = report.read_text()
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    git("add", "reports")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the report")
    _, client, experiment_id = mlflow_store
    for run in client.search_runs([experiment_id], "tags.`dvc.exp_name` = 'sw-l2-0.001-s2'"):
        client.delete_run(run.info.run_id)
    with pytest.raises(ParamsError, match="8 runs where the committed file has 9"):
        build(tmp_path, mlflow_store, grid)
    assert report.read_text() == full
    plan = plans.load(grid)
    path.build(plan, "sw", tmp_path / "reports", mlflow_store[0], "overfitting", force=True)
    assert "Built from 8 finished runs." in report.read_text()


def test_a_missing_seed_pairs_only_the_seeds_both_have(tmp_path, mlflow_store):
    grid = l2_sweep(tmp_path, mlflow_store, skip={"sw-l2-0.001-s2"})
    text = build(tmp_path, mlflow_store, grid).read_text()
    cells = row(text, "0.001")
    assert cells[1] == "2 (no s2)"
    assert cells[4] == "50.5 ± 2.1%"
    assert cells[6] == interval([8, 9]) == "+8.5 pt [+2.1, +14.9]"  # t(0.975, 1) = 12.7
    assert cells[8] == "helps"


def test_a_strength_with_fewer_seeds_is_chosen_against_the_baseline_on_the_seeds_both_have(
    tmp_path, mlflow_store
):
    """The baseline has seeds 0-2 (validation 46, 40, 40%: mean 42), 1e-4 only seed 0 (44%).
    Against the baseline's mean, the one seed would win; on seed 0, which both have, the
    baseline does, and the report says which seeds the choice compared."""
    runs = {
        "baseline": [(0.9, 0.46, 0.40), (0.9, 0.40, 0.40), (0.9, 0.40, 0.40)],
        "l2-0.0001": [(0.9, 0.44, 0.50)],
    }
    text = build(tmp_path, mlflow_store, l2_sweep(tmp_path, mlflow_store, runs=runs)).read_text()
    chosen = json.loads((tmp_path / "reports/sw-chosen.json").read_text())["l2"]
    assert chosen["baseline"] is True
    assert "Compared on seeds 0, which every row has." in text
    assert row(text, "**baseline (none) ✓**")[3] == "42.0 ± 3.5%"  # the table keeps every seed


def test_one_seed_has_no_interval(tmp_path, mlflow_store):
    one_seed = {r: per_seed[:1] for r, per_seed in RUNS.items()}
    grid = l2_sweep(tmp_path, mlflow_store, runs=one_seed)
    text = build(tmp_path, mlflow_store, grid).read_text()
    assert row(text, "0.001")[6:] == ["+8.0 pt [—]", "-38.0 pt [—]", "— (one seed)"]


def test_figures_and_the_parent_run(tmp_path, mlflow_store):
    _, client, experiment_id = mlflow_store
    grid = l2_sweep(tmp_path, mlflow_store)
    build(tmp_path, mlflow_store, grid)
    figure = tmp_path / "reports/sw-path-l2.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000

    parents = client.search_runs([experiment_id], "tags.`sweep.prefix` = 'sw'")
    assert len(parents) == 1 and parents[0].info.run_name == "sw"
    parent = parents[0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert artifacts == {"sw-path.md", "sw-chosen.json", "sw-path-l2.png"}
    children = client.search_runs([experiment_id], "tags.`dvc.exp_name` LIKE 'sw-%'")
    assert len(children) == 9
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent}

    # Rebuilt (say, after more seeds arrived): the same parent run, its artifacts replaced.
    build(tmp_path, mlflow_store, grid)
    assert [
        r.info.run_id for r in client.search_runs([experiment_id], "tags.`sweep.prefix` = 'sw'")
    ] == [parent]


def test_two_machines_parent_runs_made_at_once_become_one(tmp_path, mlflow_store):
    """Two shards' reports that both found no parent made one each; the next report keeps the
    oldest (on every machine: by start time, then run id), deletes the other and re-tags."""
    _, client, experiment_id = mlflow_store
    grid = l2_sweep(tmp_path, mlflow_store)
    tags = {"sweep.prefix": "sw", "sweep.grid": "sw"}
    first = client.create_run(experiment_id, run_name="sw", tags=tags, start_time=1000)
    second = client.create_run(experiment_id, run_name="sw", tags=tags, start_time=2000)
    for run in client.search_runs([experiment_id], "tags.`dvc.exp_name` LIKE 'sw-%'"):
        client.set_tag(run.info.run_id, "mlflow.parentRunId", second.info.run_id)

    build(tmp_path, mlflow_store, grid)
    parents = client.search_runs([experiment_id], "tags.`sweep.prefix` = 'sw'")
    assert [r.info.run_id for r in parents] == [first.info.run_id]
    assert client.get_run(second.info.run_id).info.lifecycle_stage == "deleted"
    children = client.search_runs([experiment_id], "tags.`dvc.exp_name` LIKE 'sw-%'")
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {first.info.run_id}


def test_a_learning_curve_compares_with_the_first_recipe_at_the_same_size(tmp_path, mlflow_store):
    _, client, experiment_id = mlflow_store
    # x = data.train_size; null = all of CIFAR-10's training set less validation: 10 × 4,500.
    results = {  # (recipe, label): test accuracy per seed
        ("plain", "1000"): [0.30, 0.32],
        ("plain", "none"): [0.60, 0.62],
        ("flip", "1000"): [0.35, 0.38],
        ("flip", "none"): [0.60, 0.63],
    }
    for (recipe, size), tests in results.items():
        for seed, test in enumerate(tests):
            params = {
                "data.train_size": "1000" if size == "1000" else "None",
                "data.source": P.BUNDLED,
                "data.val_fraction": 0.1,
                "augment.flip": recipe == "flip",
                "seed": seed,
            }
            add_run(client, experiment_id, f"lc-{recipe}-{size}-s{seed}", params, 0.9, test, test)
    sizes = [{"data.train_size": 1000}, {"data.train_size": None}]
    grid = write_grid(
        tmp_path,
        baseline=False,
        seeds=[0, 1],
        techniques={
            "plain": {"param": "data.train_size", "points": sizes, "scale": "log"},
            "flip": {
                "param": "data.train_size",
                "points": sizes,
                "with": {"augment.flip": True},
                "scale": "log",
            },
        },
    )
    plan = plans.load(grid)
    text = path.build(plan, "lc", tmp_path / "reports", mlflow_store[0], "overfitting").read_text()
    assert "baseline (none)" not in text
    assert row(text, "1000")[8] == "reference"  # plain's rows: the reference itself
    flip = text.split("## flip")[1]
    assert row(flip, "1000")[6] == interval([5, 6])
    assert row(flip, "none (45000)")[6] == interval([0, 1])
    assert "✓" not in text and "Chosen on validation" not in text  # sizes are not chosen
    assert (
        path.train_images(
            client.search_runs([experiment_id], "tags.`dvc.exp_name` = 'lc-plain-none-s0'")[0]
        )
        == 45_000
    )
    assert (tmp_path / "reports/lc-path-plain.png").exists()
    assert (tmp_path / "reports/lc-path-flip.png").exists()


def test_the_committed_sweep_plan_loads():
    sweep = plans.load("sweep")
    assert sweep.baseline and sweep.seeds == (0, 1, 2)
    early = next(t for t in sweep.techniques if t.name == "early-stopping")
    assert early.points[0] == (
        "5",
        {"train.early_stopping.patience": 5, "train.early_stopping.enabled": True},
    )


def test_the_strength_is_read_from_the_logged_params_not_the_name(tmp_path, mlflow_store):
    # A name's label is for people, and can round (f"{1.234567e-4:g}" is "0.000123457"): the
    # value a run logged is the truth. Here the runs named 0.0001 logged 1.5e-4.
    strengths = {**STRENGTH, "l2-0.0001": 1.5e-4}
    grid = l2_sweep(tmp_path, mlflow_store)
    _, client, experiment_id = mlflow_store
    for run in client.search_runs([experiment_id], "tags.`dvc.exp_name` LIKE 'sw-l2-0.0001-%'"):
        client.delete_run(run.info.run_id)  # deleted runs are not searched
    for seed, (train, val, test) in enumerate(RUNS["l2-0.0001"]):
        params = {"train.l2": strengths["l2-0.0001"], "seed": seed}
        add_run(client, experiment_id, f"sw-l2-0.0001-s{seed}", params, train, val, test)
    build(tmp_path, mlflow_store, grid)
    assert json.loads((tmp_path / "reports/sw-chosen.json").read_text())["l2"]["value"] == 1.5e-4
    assert (
        "Chosen on validation: train.l2 = 0.00015 (validation 47.0%"
        in (tmp_path / "reports/sw-path.md").read_text()
    )


def test_the_command_line_refuses_an_unknown_plan_in_one_line(monkeypatch):
    from stages.experiments import engine

    monkeypatch.setattr("sys.argv", ["engine", "report", "--grid", "nope"])
    with pytest.raises(SystemExit) as exit_:
        engine.main()
    assert str(exit_.value).startswith("error (engine): no plan 'nope' (known: ")
    assert "\n" not in str(exit_.value)


def test_a_report_holds_every_seed_a_pass_ran_not_only_the_plans(tmp_path, mlflow_store):
    # A plan of seed 0, after `engine run --seeds 1,2`: a later pass of the plan's own seed (or
    # `engine report`) reports all three, rather than dropping the runs of seeds 1 and 2.
    grid = l2_sweep(tmp_path, mlflow_store)
    techniques = yaml.safe_load(open(grid))["techniques"]
    plan = plans.load(write_grid(tmp_path, seeds=[0], techniques=techniques))
    out = tmp_path / "reports"
    every = path.build(plan, "sw", out, mlflow_store[0], "overfitting", seeds=[1, 2]).read_text()
    assert row(every, "baseline (none)")[1] == "3"
    again = path.build(plan, "sw", out, mlflow_store[0], "overfitting").read_text()
    assert row(again, "baseline (none)")[1] == "3"
    assert again == every


def test_the_seeds_of_a_report_are_read_from_the_plans_own_experiment_names():
    plan = plans.load("finetune-cpu-path-5k")
    names = [
        "ftcpu-path-5k-baseline-s0",
        "ftcpu-path-5k-l2-sp-0.01-s2",
        "ftcpu-path-5k-epochs-4-s7",
        "ftcpu-path-5k-nope-s5",  # not a row of the plan
        "ftcpu-path-5k-seeds-baseline-s9",  # another prefix's pass, not this one's
        "ftcpu-path-5k-t3-s4",  # a search's rerun under the same prefix
    ]
    assert plans.seeds_run(plan, "ftcpu-path-5k", names) == [0, 2, 7]
    assert plans.seeds_run(plan, "ftcpu-path-5k", names, seeds=[3]) == [0, 2, 3, 7]
