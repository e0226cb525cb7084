"""The comparison report over MLflow runs."""

from __future__ import annotations

import sys

from conftest import TINY, committed_params_text, write_params
from mlflow.tracking import MlflowClient

from stages import augment, download, evaluate, train
from stages.experiments import compare


def run_named(workdir, monkeypatch, name: str, **overrides) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", name)
    write_params(workdir, **{**TINY, **overrides})
    train.main()
    evaluate.main()


def test_report_holds_every_run_and_the_params_that_differ(workdir, pickle_archive, monkeypatch):
    write_params(workdir, **{**TINY, "data.source": str(pickle_archive)})
    download.main()
    augment.main()
    source = {"data.source": str(pickle_archive)}
    run_named(workdir, monkeypatch, "slow", **source, **{"train.lr": 0.001})
    run_named(workdir, monkeypatch, "fast", **source, **{"train.lr": 0.05})
    run_named(workdir, monkeypatch, "dropout", **source, **{"train.lr": 0.05, "model.dropout": 0.5})

    monkeypatch.setattr(sys, "argv", ["compare"])
    compare.main()
    report = (workdir / "reports/comparison.md").read_text().splitlines()
    assert report[0] == (
        "| run | model.dropout | train.lr | train acc | val acc | test acc | gap | "
        "best epoch | epochs | minutes | verdict |"
    )
    assert len(report) == 2 + 3
    # Each row holds its run's own results, as MLflow has them.
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("overfitting")
    for run in client.search_runs([experiment.experiment_id]):
        m, name = run.data.metrics, run.info.run_name
        params = {"slow": "0.0 | 0.001", "fast": "0.0 | 0.05", "dropout": "0.5 | 0.05"}[name]
        row = next(line for line in report if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        minutes = (run.info.end_time - run.info.start_time) / 60000
        assert cells == [
            name,
            *params.split(" | "),
            f"{100 * m['final_train_accuracy']:.1f}%",
            f"{100 * m['final_val_accuracy']:.1f}%",
            f"{100 * m['test_accuracy']:.1f}%",
            f"{100 * m['generalization_gap']:+.1f} pt",
            f"{m['final_best_epoch']:.0f}",
            str(TINY["train.epochs"]),
            f"{minutes:.1f}",
            run.data.tags["verdict"],
        ]
    for png in ("curves.png", "gap.png"):
        assert (workdir / "reports" / png).stat().st_size > 5000

    monkeypatch.setattr(sys, "argv", ["compare", "--exps", "slow,dropout", "--out", "reports/two"])
    compare.main()
    two = (workdir / "reports/two/comparison.md").read_text().splitlines()
    assert len(two) == 4 and two[2].startswith("| slow |") and two[3].startswith("| dropout |")


def test_prefix_selects_the_runs_and_names_the_files(tmp_path, monkeypatch):
    """--prefix P: the runs of DVC experiments P-… only (issue 28: it named the files and
    compared every run), in reports/P-comparison.md, P-curves.png, P-gap.png."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("overfitting", (tmp_path / "mlruns").as_uri())
    runs = [("P-at-chance", 0.1002, 0.1001), ("P-learns", 0.90, 0.45), ("other", 0.5, 0.4)]
    for name, train_acc, test_acc in runs:
        run = client.create_run(experiment, run_name=name, tags={"dvc.exp_name": name})
        for epoch in (1, 2, 3):
            client.log_metric(run.info.run_id, "val_accuracy", test_acc, step=epoch)
        for key, value in [
            ("final_train_accuracy", train_acc),
            ("final_val_accuracy", test_acc),
            ("test_accuracy", test_acc),
            ("generalization_gap", train_acc - test_acc),
        ]:
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(committed_params_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "argv", ["compare", "--prefix", "P"])
    compare.main()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "P-comparison.md",
        "P-curves.png",
        "P-gap.png",
    ]
    table = (tmp_path / "reports/P-comparison.md").read_text()
    assert "| P-at-chance | 10.0% | 10.0% | 10.0% | +0.0 pt |" in table
    assert "| P-learns | 90.0% | 45.0% | 45.0% | +45.0 pt |" in table
    assert "other" not in table


def test_the_gap_axis_does_not_zoom_onto_noise():
    # A run at chance: a gap of 0.01 points must not fill the axis.
    lo, hi = compare.gap_limits([0.01, -0.01])
    assert hi - lo >= compare.MIN_GAP_SPAN and lo < -0.01 and hi > 0.01
    # Real gaps: every bar and 0 inside, with room for the labels.
    lo, hi = compare.gap_limits([50.0, 8.0, -3.0])
    assert lo < -3.0 and hi > 50.0 and hi - lo < 70
