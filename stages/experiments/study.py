"""A study: one DVC experiment per (row of a grid, seed), and a table of the results.

    python -m stages.experiments.study run   [--grid G] [--jobs N] [--rows a,b] [--seeds 0,1,2]
                                             [--set key=value ...] [--prefix P] [--source S --sha256 H]
    python -m stages.experiments.study table [--grid G] [--prefix P] [--out FILE]

A grid is a YAML file in stages/experiments/grids/ (regularization, the default; finetune;
multitask): the regime every row starts from, the seeds, and the rows, each a set of params.yaml
changes. Every experiment is the committed params.yaml plus the regime, the row and its seed: the
study refuses to start while params.yaml has uncommitted changes, which DVC would carry into
every queued experiment. `run` queues the grid with `dvc exp run --queue` (each experiment named study-<row>-s<seed>,
in a temporary workspace, so edits made while it runs can't leak in), runs the queue with
`dvc queue start -j N`, waits for it, then writes the table and, run by run, the comparison
report of `python -m stages.experiments.compare`. `table` reads the runs back from MLflow by their DVC
experiment names and prints mean ± std over seeds.

The regime overfits on purpose (5,000 training images, 60 epochs, lr 0.01): the baseline's
training accuracy passes 90% while its test accuracy stays near 45%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages import io as sio, params as P
from stages.errors import ParamsError
from stages.experiments import dvcqueue, reports

GRIDS_DIR = Path(__file__).parent / "grids"
GRID_KEYS = {"regime", "seeds", "shared", "rows"}


@dataclass(frozen=True)
class Grid:
    """A study grid (grids/<name>.yaml): the regime every row starts from, and its rows."""

    name: str
    regime: dict
    seeds: tuple[int, ...]
    rows: dict[str, dict]


def grid_names() -> list[str]:
    """The study grids; sweep grids (with `techniques`, for sweep.py) live beside them."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml") if not is_sweep_grid(p))


def is_sweep_grid(path: Path) -> bool:
    try:
        return "techniques" in (yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return False  # load_grid says what is wrong with it


def read_grid(path: Path, known: list[str]) -> dict:
    """A grid file's YAML (a study's or a sweep's), or one line saying why not."""
    if not path.exists():
        raise ParamsError(f"no grid {path.stem!r} (known: {', '.join(known)})")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_grid(name: str, base: dict | None = None) -> Grid:
    """grids/<name>.yaml, every row checked against the params schema (on top of `base`,
    params.yaml by default): a typo or a refused value stops here, before anything is queued."""
    path = GRIDS_DIR / f"{name}.yaml"
    data = read_grid(path, grid_names())
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown or not isinstance(data.get("rows"), dict) or not data["rows"]:
        raise ParamsError(
            f"{path}: a grid has {', '.join(sorted(GRID_KEYS))} and at least one row "
            f"under rows" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    regime = data.get("regime") or {}
    rows = {row: changes or {} for row, changes in data["rows"].items()}
    base = base if base is not None else P.read_yaml()
    for row, changes in rows.items():
        if not isinstance(changes, dict):
            raise ParamsError(f"{path}: row {row!r} must map params to values, got {changes!r}")
        try:
            P.parse(P.with_changes(base, {**regime, **changes}))
        except ParamsError as exc:
            raise ParamsError(f"{path}: row {row!r}: {exc}") from None
    return Grid(name, regime, tuple(data.get("seeds") or (0, 1, 2)), rows)


def default_out(prefix: str, grid: str) -> Path:
    """reports/study.md for the regularization study, reports/study-finetune.md, ...;
    reports/<prefix>.md for a pass under other names, so it never overwrites the study's table."""
    return Path("reports") / (f"{prefix}.md" if grid == "regularization" else f"{prefix}-{grid}.md")


def exp_name(row: str, seed: int, prefix: str = "study") -> str:
    return f"{prefix}-{row}-s{seed}"


def overrides(
    grid: Grid,
    row: str,
    seed: int,
    source: str | None = None,
    sha256: str | None = None,
    extra: dict | None = None,
) -> dict:
    """The params of one experiment: the grid's regime, the row's changes, the seed, and then
    `extra` (study run --set key=value) over all of them."""
    values = {**grid.regime, **grid.rows[row], "seed": seed, **(extra or {})}
    if source:
        values["data.source"] = source
    if sha256:
        values["data.sha256"] = sha256
    P.parse(P.with_changes({}, values))  # a typo in the grid fails here, before anything is queued
    return values


def experiments(
    grid: Grid,
    rows,
    seeds,
    source=None,
    sha256=None,
    extra: dict | None = None,
    prefix: str = "study",
) -> list[tuple[str, dict]]:
    """(name, params changes) of every experiment, seed by seed, so that a queue cut short
    leaves every row with the same seeds."""
    return [
        (exp_name(row, seed, prefix), overrides(grid, row, seed, source, sha256, extra))
        for seed in seeds
        for row in rows
    ]


def table(grid: Grid, rows=None, seeds=None, prefix: str = "study") -> str | None:
    """mean ± std over seeds of every row that MLflow has runs of; None when it has none."""
    rows, seeds = rows or list(grid.rows), seeds or grid.seeds
    client, experiment_id, _, _ = reports.open_experiment()
    by_name = reports.finished_runs(client, experiment_id, prefix) if experiment_id else {}
    found_by_row = {
        row: [
            by_name[exp_name(row, s, prefix)] for s in seeds if exp_name(row, s, prefix) in by_name
        ]
        for row in rows
    }
    found_by_row = {row: found for row, found in found_by_row.items() if found}
    # Auxiliary tasks' columns (stages/networks/tasks.py) only when some row has them.
    task_keys = [
        k
        for k in ("test_coarse_accuracy", "test_rotation_accuracy")
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
        changes = ", ".join(f"{k}={v}" for k, v in grid.rows[row].items()) or "—"
        cells = [
            row,
            changes,
            str(len(found)),
            _pm(m("final_train_accuracy")),
            _pm(m("test_accuracy")),
            _pm(m("generalization_gap"), " pt"),
            *(_task_cell(found, k) for k in task_keys),
            f"{statistics.mean(m('final_epochs_run')):.0f}",
            f"{statistics.mean(minutes):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not found_by_row:
        return None
    runs = sum(len(found) for found in found_by_row.values())
    return "\n".join(lines) + "\n\n" + reports.RUNS_LINE.format(n=runs) + "\n"


def _task_cell(runs, key: str) -> str:
    return (
        _pm([r.data.metrics[key] for r in runs])
        if all(key in r.data.metrics for r in runs)
        else "—"
    )


def _pm(values: list[float], unit: str = "%") -> str:
    """mean ± sample standard deviation, in percent (or points); the mean alone for one value."""
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}{unit}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}{unit}"


def main() -> None:
    args = parse_args()
    try:
        check_committed_params()
        grid = load_grid(args.grid)
        rows = args.rows.split(",") if args.rows else list(grid.rows)
        unknown = sorted(set(rows) - set(grid.rows))
        if unknown:
            raise ParamsError(f"unknown rows {unknown}; the grid has: {', '.join(grid.rows)}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(grid.seeds)
        extra = parse_sets(args.set)
        for row in rows:  # --set and --source must make valid params with every row
            overrides(grid, row, seeds[0], args.source, args.sha256, extra)
    except ParamsError as exc:
        sys.exit(f"error (study): {exc}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    table_rows, table_seeds, failed = rows, seeds, []
    if args.command == "run":
        todo = experiments(grid, rows, seeds, args.source, args.sha256, extra, args.prefix)
        failed = dvcqueue.run(todo, args.jobs, "study")
        # The table of the whole grid as MLflow knows it: a run of a few rows or seeds adds to
        # the table instead of cutting it down to them.
        table_rows, table_seeds = list(grid.rows), sorted(set(grid.seeds) | set(seeds))
    written = write_table(grid, table_rows, table_seeds, args)
    if args.command == "run":  # and every run just made that finished: the comparison report
        finished = [name for name, _ in todo if name not in failed]
        if finished:
            compare = [sys.executable, "-m", "stages.experiments.compare", "--exps"]
            subprocess.run([*compare, ",".join(finished), "--prefix", args.prefix], check=True)
    dvcqueue.exit_if_failed(failed, "study")
    if args.command == "table" and not written:
        sys.exit(1)  # asked for the table, got none (the line above says why)


def write_table(grid: Grid, rows: list[str], seeds: list[int], args) -> bool:
    """The table, unless it would be empty or hold less than the committed file (one line
    saying so instead); whether it was written."""
    out = args.out or default_out(args.prefix, args.grid)
    text = table(grid, rows, seeds, args.prefix)
    if text is None:
        print(
            f"study: no finished run of grid {grid.name!r} named {args.prefix}-…: nothing written"
        )
        return False
    try:
        reports.check_not_less(out, text, args.force)
    except reports.Refused as exc:
        print(f"study: {exc}")
        return False
    sio.write_text(out, text)
    print(text)
    return True


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument(
        "--grid",
        default="regularization",
        help=f"a grid of stages/experiments/grids/ ({', '.join(grid_names())})",
    )
    parser.add_argument("--source", help="data.source for every run (default: params.yaml's)")
    parser.add_argument("--sha256", help="data.sha256 for every run")
    parser.add_argument("--jobs", type=int, default=1, help="parallel DVC queue workers")
    parser.add_argument("--rows", help="comma-separated rows of the grid (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    parser.add_argument(
        "--out",
        type=Path,
        help="the table's file (default: reports/<prefix>.md, "
        "reports/<prefix>-<grid>.md for another grid)",
    )
    add_set_option(parser, "row")
    parser.add_argument(
        "--force", action="store_true", help="replace a committed table even with fewer rows"
    )
    parser.add_argument(
        "--prefix", default="study", help="experiment names <prefix>-<row>-s<seed> (default: study)"
    )
    return parser.parse_args()


def add_set_option(parser: argparse.ArgumentParser, each: str) -> None:
    """--set KEY=VALUE (repeatable), read by parse_sets; the sweep takes it too."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a param over every {each} (repeatable), e.g. --set train.epochs=5 for "
        "a quick pass; use it with another --prefix",
    )


def parse_sets(items: list[str]) -> dict:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(value)  # as in params.yaml: 5 → int, null → None
    return extra


def check_committed_params(path: Path = P.PARAMS_FILE) -> None:
    """Every row is built from the committed params.yaml: refuse to start while the workspace's
    differs from it (a `dvc exp run -S` leaves its values there), naming the keys that differ."""
    committed = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    if committed.returncode != 0:
        return  # not in git (yet): nothing to compare with
    old = P.flatten_dict(yaml.safe_load(committed.stdout) or {})
    new = P.flatten_dict(P.read_yaml(path))
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>")
    )
    if changed:
        shown = ", ".join(f"{k}={new.get(k, '<absent>')!r}" for k in changed[:5])
        raise ParamsError(
            f"params.yaml has uncommitted changes ({shown}"
            f"{', …' if len(changed) > 5 else ''}), which every experiment would "
            "inherit: commit them, or `git checkout params.yaml`"
        )


if __name__ == "__main__":
    main()
