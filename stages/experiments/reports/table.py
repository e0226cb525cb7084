"""A study's table: mean ± std over seeds of every row of a `rows` plan that has finished runs.

Written to reports/<prefix>-<plan>.md, or to the plan's `report:` file for a pass under its own
prefix (reports/study.md for the regularization study); never from no runs, and never over
a committed table that has more rows or runs (unless forced): see stages/experiments/reports.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from stages import io as sio
from stages.errors import ParamsError
from stages.experiments import plan as plans, reports

TASK_METRICS = ("test_coarse_accuracy", "test_rotation_accuracy")  # multi-task runs


def out_file(plan: plans.Plan, prefix: str, out_dir: Path = Path("reports")) -> Path:
    if plan.report and prefix == plan.prefix:
        return out_dir / plan.report
    return out_dir / f"{prefix}-{plan.name}.md"


def found(plan: plans.Plan, by_name: dict, prefix: str, seeds) -> dict[str, list]:
    """{row: its runs, seed by seed} of the rows that have runs in `by_name`."""
    by_row = {
        row: [
            by_name[plans.exp_name(prefix, row, s)]
            for s in seeds
            if plans.exp_name(prefix, row, s) in by_name
        ]
        for row in plan.rows
    }
    return {row: runs for row, runs in by_row.items() if runs}


def text(plan: plans.Plan, found_by_row: dict[str, list]) -> str:
    """The table of the rows' runs ({row: runs})."""
    # Auxiliary tasks' columns only when some row has them.
    task_keys = [
        k
        for k in TASK_METRICS
        if any(k in r.data.metrics for found in found_by_row.values() for r in found)
    ]
    header = [
        "technique",
        "params (on top of the regime)",
        "seeds",
        "train accuracy",
        "test accuracy",
        "gap (train − test)",
        *(k.replace("_", " ") for k in task_keys),
        "epochs run",
        "minutes (train + evaluate)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, found in found_by_row.items():
        m = lambda key, found=found: [r.data.metrics[key] for r in found]
        minutes = [(r.info.end_time - r.info.start_time) / 60000 for r in found]
        changes = ", ".join(f"{k}={v}" for k, v in plan.rows[row].items()) or "—"
        cells = [
            row,
            changes,
            str(len(found)),
            pm(m("final_train_accuracy")),
            pm(m("test_accuracy")),
            pm(m("generalization_gap"), " pt"),
            *(_task_cell(found, k) for k in task_keys),
            f"{statistics.mean(m('final_epochs_run')):.0f}",
            f"{statistics.mean(minutes):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    runs = sum(len(found) for found in found_by_row.values())
    return "\n".join([*lines, "", reports.RUNS_LINE.format(n=runs)]) + "\n"


def _task_cell(runs, key: str) -> str:
    return (
        pm([r.data.metrics[key] for r in runs]) if all(key in r.data.metrics for r in runs) else "—"
    )


def pm(values: list[float], unit: str = "%") -> str:
    """mean ± sample standard deviation, in percent (or points); the mean alone for one value."""
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}{unit}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}{unit}"


def build(
    plan: plans.Plan,
    prefix: str,
    seeds=None,
    force: bool = False,
    out_dir: Path = Path("reports"),
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> Path:
    """The table of the plan's rows (every seed of the plan, of `seeds` and of any earlier pass:
    plans.seeds_run) from MLflow, logged to the pass's parent run; its path. ParamsError (one
    line) when nothing was written."""
    client, experiment_id, experiment, tracking_uri = reports.open_experiment(
        tracking_uri, experiment
    )
    by_name = reports.finished_runs(client, experiment_id, prefix) if experiment_id else {}
    by_row = found(plan, by_name, prefix, plans.seeds_run(plan, prefix, by_name, seeds))
    if not by_row:
        raise ParamsError(
            f"no finished run of plan {plan.name!r} named {prefix}-… in experiment "
            f"{experiment!r} of {tracking_uri}: nothing written"
        )
    out, table = out_file(plan, prefix, out_dir), text(plan, by_row)
    reports.check_not_less(out, table, force, keyed=True)
    sio.write_text(out, table)
    children = [run for runs in by_row.values() for run in runs]
    reports.log_to_parent(client, experiment_id, prefix, plan.name, [out], children)
    return out
