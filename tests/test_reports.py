"""Reports never destroy, and the docs say what the commands do: an empty store writes nothing,
a committed report is not replaced by one that holds less, cited results are committed and not
ignored, `make sweep`'s workers and the docs' counts match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_params

from stages.experiments import engine, plan as plans, reports

TABLE = """| technique | seeds |
|---|---|
| baseline | 3 |
| dropout | 3 |

Built from 6 finished runs.
"""


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def commit_all(folder: Path) -> None:
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")


def test_rows_and_runs_are_read_from_a_report():
    assert reports.table_rows(TABLE) == 2 and reports.runs_in(TABLE) == 6
    assert reports.table_rows("no table\n") == 0 and reports.runs_in("no table\n") is None


def test_a_committed_report_is_not_replaced_by_less_unless_forced(tmp_path):
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports/study.md"
    report.write_text(TABLE)
    commit_all(tmp_path)
    one_row = TABLE.replace("| dropout | 3 |\n", "").replace("6 finished", "3 finished")
    with pytest.raises(reports.Refused) as err:
        reports.check_not_less(report, one_row)
    assert "1 table rows where the committed file has 2" in str(err.value)
    assert "\n" not in str(err.value)
    fewer_seeds = TABLE.replace("6 finished", "4 finished")
    with pytest.raises(reports.Refused, match="4 runs where the committed file has 6"):
        reports.check_not_less(report, fewer_seeds)
    reports.check_not_less(report, one_row, force=True)  # asked for
    reports.check_not_less(report, TABLE + "| l2 | 3 |\n")  # more: fine
    reports.check_not_less(tmp_path / "reports/quick.md", one_row)  # not committed: fine


def test_a_committed_path_is_not_replaced_by_one_that_lost_points_even_with_more_rows(tmp_path):
    """A pass over other techniques, reported from a store that lacks the committed points (made
    on another machine, say): more rows in all, but the committed points gone. Refused, unless
    forced; a report with every committed row and more is written."""
    path = """# p: the regularization path

## l2 (`train.l2`)

| strength | seeds |
|---|---|
| baseline (none) | 1 |
| **0.001 ✓** | 1 |

Built from 2 finished runs.
"""
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports/p-path.md"
    report.write_text(path)
    commit_all(tmp_path)
    other = path.replace("## l2 (`train.l2`)", "## dropout (`model.dropout`)").replace(
        "| **0.001 ✓** | 1 |", "| 0.1 | 1 |\n| **0.3 ✓** | 1 |"
    )
    assert reports.table_rows(other) > reports.table_rows(path)
    with pytest.raises(reports.Refused, match="no row 'l2: baseline \\(none\\)' and 1 more"):
        reports.check_not_less(report, other.replace("2 finished", "3 finished"), keyed=True)
    reports.check_not_less(report, other, keyed=True, force=True)
    rechosen = path.replace("| **0.001 ✓** | 1 |", "| 0.001 | 1 |\n| **0.01 ✓** | 1 |")
    reports.check_not_less(report, rechosen, keyed=True)  # every point kept, the choice moved


def test_a_table_from_an_empty_store_leaves_the_committed_file_as_it_was(
    tmp_path, monkeypatch, capsys
):
    """Issue 28: the study's table (then `study table`) on a store without study runs overwrote reports/study.md (15
    rows) with an empty table."""
    write_params(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/study.md").write_text(TABLE)
    commit_all(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setattr(sys, "argv", ["engine", "report", "--grid", "regularization"])
    with pytest.raises(SystemExit) as exit_:
        engine.main()
    assert exit_.value.code == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(
        "engine: no report: no finished run of plan 'regularization' named study-…"
    )
    assert line.endswith("nothing written")
    assert (tmp_path / "reports/study.md").read_text() == TABLE


def test_no_committed_file_is_ignored_and_every_cited_report_is_committed():
    ignored = subprocess.run(
        ["git", "ls-files", "-ci", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert ignored == [], f"committed but git-ignored: {ignored}"
    committed = set(
        subprocess.run(
            ["git", "ls-files", "reports"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    cited = set()
    for page in pages:
        for link in re.findall(r"\]\(((?:\.\./)?reports/[^)#\s]+)\)", page.read_text()):
            cited.add(link.removeprefix("../"))
    assert cited and cited <= committed, f"cited but not committed: {sorted(cited - committed)}"


def make_dry_run(target: str, **variables: str) -> str:
    """The command `make <target>` would run (without building the environment)."""
    args = [f"{k}={v}" for k, v in variables.items()]
    result = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", target, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return next(line for line in result.stdout.splitlines() if "stages.experiments" in line)


def test_make_sweep_runs_the_workers_the_readme_says():
    documented = re.search(r"`make sweep` \(= `([^`]+)`\)", (REPO / "README.md").read_text())
    assert documented, "the README no longer says what `make sweep` runs"
    assert make_dry_run("sweep").split() == documented.group(1).split()
    assert "--jobs 2" in make_dry_run("study")
    assert make_dry_run("sweep", JOBS="1").split()[-2:] == ["--jobs", "1"]


def test_counts_the_docs_state_are_the_grids():
    """Issue 28: '38 experiments per seed' (the grid had 28), a 30-epoch regime (60)."""
    grid = plans.load("sweep")
    per_seed = len(plans.experiments(grid, plans.select(grid, None), [0], "sweep"))
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for stated in re.findall(r"(\d+) experiments per seed", page.read_text()):
            assert int(stated) == per_seed, f"{page.name}: {stated} experiments per seed"
    text = (REPO / "docs/experiments.md").read_text()
    shown = re.search(r"^regime: \{(.+)\}$", text, re.M).group(1)
    for item in shown.split(", "):
        key, value = item.split(": ")
        assert str(grid.regime[key]) == value, f"docs show {key}: {value}, the grid has it so"


def test_the_quick_pass_is_one_command_in_the_readme_and_the_docs():
    """The quick pass the README shows is the one docs/experiments.md describes, and it leaves
    the plateau that the grid's SGD sits on for its first epochs (Adam)."""
    readme = re.search(r'`make sweep SWEEP_ARGS="([^"]+)"`', (REPO / "README.md").read_text())
    assert readme and "--set train.optimizer=adam" in readme.group(1)
    docs = (REPO / "docs/experiments.md").read_text()
    assert f"python -m stages.experiments.engine run --grid sweep {readme.group(1)}" in docs


def test_a_search_report_says_when_the_target_was_reached_and_the_epochs_spent_by_then():
    """The first trial to end at or above the target (by time, not by number), and every epoch
    of the trials that had started by then, the one beside it included."""
    from datetime import datetime, timedelta

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial, TrialState

    from stages.experiments.reports import search

    t0 = datetime(2026, 1, 1)
    study = optuna.create_study(direction="maximize")
    # (state, value, epochs, start minute, end minute)
    for state, value, epochs, start, end in [
        (TrialState.COMPLETE, 0.50, 6, 0, 6),  # below the target
        (TrialState.PRUNED, 0.30, 2, 0, 2),
        (TrialState.COMPLETE, 0.61, 6, 2, 9),  # reaches it, but ends after trial 3
        (TrialState.COMPLETE, 0.58, 6, 6, 8),  # reaches it first
        (TrialState.COMPLETE, 0.70, 6, 9, 15),  # started after: not counted
        (TrialState.FAIL, None, 3, 7, 7.5),  # failed beside it: its epochs count
    ]:
        study.add_trial(
            FrozenTrial(
                number=0, trial_id=0, state=state, value=value, values=None,
                datetime_start=t0 + timedelta(minutes=start),
                datetime_complete=t0 + timedelta(minutes=end),
                params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                user_attrs={}, system_attrs={},
                intermediate_values={e: value or 0.1 for e in range(1, epochs + 1)},
            )
        )  # fmt: skip
    assert search.reached(study, 0.57) == {"trial": 3, "value": 0.58, "trials": 5, "epochs": 23}
    assert search.reached(study, 0.9) is None
    plan = plans.Plan("joint", "space", "j", {}, (0,), {}, search={"target": {
        "val_accuracy": 0.57, "epochs": 100}, "seeds_of_the_best": [0, 1]})  # fmt: skip
    counts = search.summary(study)
    assert counts["wall_minutes"] == 15  # 0–15 with no gap: trials side by side count once
    (line, _) = search.target_lines(plan, study, "j", counts)
    assert "first reached by j-t3 (58.0%), after at most 23 epochs in 5 trials" in line
    assert "(**23%** of the 100 epochs" in line
    minute = timedelta(minutes=1)
    assert search.busy_seconds([(t0, t0 + minute), (t0 + 5 * minute, t0 + 6 * minute)]) == 120
    report = search.text(plan, study, "j", {}, {})
    assert "Each trial is seed 0;" in report and line in report
