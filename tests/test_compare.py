"""The comparison report over MLflow runs."""

from __future__ import annotations

import sys

from conftest import TINY, write_params
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
            f"{m['final_train_accuracy']:.3f}",
            f"{m['final_val_accuracy']:.3f}",
            f"{m['test_accuracy']:.3f}",
            f"{m['generalization_gap']:+.3f}",
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
