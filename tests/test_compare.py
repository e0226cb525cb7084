"""The comparison report over MLflow runs."""

from __future__ import annotations

import sys

from conftest import TINY, write_params
from stages import augment, compare, download, evaluate, train


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
    assert "| run | model.dropout | train.lr | train acc |" in report[0]
    assert len(report) == 2 + 3
    assert any(line.startswith("| fast | 0.0 | 0.05 |") for line in report)
    for png in ("curves.png", "gap.png"):
        assert (workdir / "reports" / png).stat().st_size > 5000

    monkeypatch.setattr(sys, "argv", ["compare", "--exps", "slow,dropout", "--out", "reports/two"])
    compare.main()
    two = (workdir / "reports/two/comparison.md").read_text().splitlines()
    assert len(two) == 4 and two[2].startswith("| slow |") and two[3].startswith("| dropout |")
