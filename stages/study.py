"""The regularization study: one DVC experiment per (technique, seed), and a table of the results.

    python -m stages.study run   [--source S --sha256 H] [--jobs N] [--rows a,b] [--seeds 0,1,2]
                                 [--set key=value ...] [--prefix P]
    python -m stages.study table [--grid G] [--prefix P] [--out FILE]

`run` queues the grid with `dvc exp run --queue` (each experiment named study-<row>-s<seed>,
in a temporary workspace, so edits made while it runs can't leak in), runs the queue with
`dvc queue start -j N`, waits for it, then writes the table and, run by run, the comparison
report of `python -m stages.compare`. `table` reads the runs back from MLflow by their DVC
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
import time
from pathlib import Path

import yaml

from stages import io as sio, params as P

REGIME = {"data.train_size": 5000, "train.epochs": 60, "train.lr": 0.01}
ONLINE = {"augment.online": True}
ROWS: dict[str, dict] = {
    "baseline": {},
    "simpler-model": {"model.width": 0.5},
    "wider-model": {"model.width": 2.0},
    "dropout": {"model.dropout": 0.5},
    "l1": {"train.l1": 1e-4},
    "l2": {"train.l2": 5e-4},
    "weight-decay": {"train.weight_decay": 1e-3},
    "early-stopping": {"train.early_stopping.enabled": True, "train.early_stopping.patience": 10},
    "crop-flip": {**ONLINE, "augment.flip": True, "augment.crop_padding": 4},
    "strong-augment": {**ONLINE, "augment.flip": True, "augment.crop_padding": 4,
                       "augment.trivial_augment": True, "augment.erasing": 0.25},
    "mixup": {"augment.mixup_alpha": 0.4},
    "label-smoothing": {"train.label_smoothing": 0.1},
    "combination": {**ONLINE, "augment.flip": True, "augment.crop_padding": 4,
                    "model.dropout": 0.3, "train.weight_decay": 5e-4},
    # The two best single techniques of the first pass (crop-flip and wider-model), together.
    "wider-crop-flip": {**ONLINE, "augment.flip": True, "augment.crop_padding": 4, "model.width": 2.0},
    "combination-full-data": {**ONLINE, "augment.flip": True, "augment.crop_padding": 4,
                              "model.dropout": 0.3, "train.weight_decay": 5e-4,
                              "data.train_size": None, "train.epochs": 30},
    # The best row of the 5,000-image regime, on the full training set.
    "wider-crop-flip-full-data": {**ONLINE, "augment.flip": True, "augment.crop_padding": 4,
                                  "model.width": 2.0, "data.train_size": None, "train.epochs": 30},
}

# Fine-tuning (EfficientNet-Lite0): ImageNet weights against random ones on 1,000 and 5,000
# training images, and what helps fine-tuning. At the data's 32 pixels: larger inputs are
# better for ImageNet features but cost 2.3× (64 pixels) or more on this CPU.
FINETUNE_REGIME = {"model.name": "efficientnet_lite0", "train.epochs": 12, "train.batch_size": 50,
                   "train.lr": 0.01}
IMAGENET = {"model.pretrained": "imagenet"}
FINETUNE_ROWS: dict[str, dict] = {}
for n in (1000, 5000):
    FINETUNE_ROWS[f"lite0-{n}-scratch"] = {"data.train_size": n}
    FINETUNE_ROWS[f"lite0-{n}-imagenet"] = {"data.train_size": n, **IMAGENET}
    FINETUNE_ROWS[f"lite0-{n}-imagenet-head-only"] = {"data.train_size": n, **IMAGENET,
                                                      "model.freeze": "backbone"}
FINETUNE_ROWS.update({
    "lite0-1000-imagenet-l2sp": {"data.train_size": 1000, **IMAGENET, "train.l2_sp": 0.01},
    "lite0-1000-imagenet-crop-flip": {"data.train_size": 1000, **IMAGENET, **ONLINE,
                                      "augment.flip": True, "augment.crop_padding": 4},
    "lite0-1000-imagenet-early-stopping": {"data.train_size": 1000, **IMAGENET,
                                           "train.early_stopping.enabled": True,
                                           "train.early_stopping.patience": 3},
})

# Multi-task (stages/tasks.py): the main task alone and with each auxiliary task, for net in the
# regularization regime and for EfficientNet-Lite0 fine-tuned from ImageNet on 5,000 images.
# Rows carry their whole regime; lite0-5000-imagenet is the fine-tuning grid's row of that name.
NET_5000 = REGIME
LITE0_5000 = {**FINETUNE_REGIME, "data.train_size": 5000, **IMAGENET}
COARSE = {"tasks.coarse.weight": 0.5}  # vehicles against animals (params.yaml's default groups)
ROTATION = {"tasks.rotation.weight": 0.5}
MULTITASK_ROWS: dict[str, dict] = {
    "net-main-only": NET_5000,
    "net-coarse": {**NET_5000, **COARSE},
    "net-rotation": {**NET_5000, **ROTATION},
    "net-both-uncertainty": {**NET_5000, **COARSE, **ROTATION, "tasks.weighting": "uncertainty"},
    "lite0-5000-imagenet": LITE0_5000,
    "lite0-5000-imagenet-coarse": {**LITE0_5000, **COARSE},
    "lite0-5000-imagenet-rotation": {**LITE0_5000, **ROTATION},
}

GRIDS = {"regularization": (REGIME, ROWS), "finetune": (FINETUNE_REGIME, FINETUNE_ROWS),
         "multitask": ({}, MULTITASK_ROWS)}
SEEDS = (0, 1, 2)


def default_out(prefix: str, grid: str) -> Path:
    """reports/study.md for the regularization study, reports/study-finetune.md, ...;
    reports/<prefix>.md for a pass under other names, so it never overwrites the study's table."""
    return Path("reports") / (f"{prefix}.md" if grid == "regularization" else f"{prefix}-{grid}.md")


def exp_name(row: str, seed: int, prefix: str = "study") -> str:
    return f"{prefix}-{row}-s{seed}"


def overrides(row: str, seed: int, source: str | None, sha256: str | None,
              grid: str = "regularization", extra: dict | None = None) -> dict:
    """The params of one experiment: the grid's regime, the row's changes, the seed, and then
    `extra` (study run --set key=value) over all of them."""
    regime, rows = GRIDS[grid]
    values = {**regime, **rows[row], "seed": seed, **(extra or {})}
    if source:
        values["data.source"] = source
    if sha256:
        values["data.sha256"] = sha256
    P.parse(P.with_changes({}, values))  # a typo in the grid fails here, before anything is queued
    return values


def queue(rows, seeds, source, sha256, grid: str = "regularization", extra: dict | None = None,
          prefix: str = "study") -> None:
    """Seed by seed, so that a queue cut short leaves every row with the same seeds."""
    for seed in seeds:
        for row in rows:
            cmd = ["dvc", "exp", "run", "--queue", "-n", exp_name(row, seed, prefix)]
            values = overrides(row, seed, source, sha256, grid, extra)
            subprocess.run(cmd + P.set_options(values), check=True)


WORKERS = Path(".dvc/tmp/exps/celery")  # where DVC's queue workers write their logs


def report_dead_workers() -> None:
    """Workers that start together can race on the file-based message broker of DVC's queue
    (kombu's filesystem transport): one reads an exchange file while the other writes it, and
    dies at start with JSONDecodeError (treeverse/dvc-task#73). The queue still completes on the
    other workers, only less in parallel. (Starting them one by one doesn't help: a second
    `dvc queue start` doesn't see a busy worker, and starts another worker 1 or waits for it.)"""
    for n in workers_that_died_starting():
        print(f"study: DVC queue worker {n} died at start (a known DVC race, treeverse/dvc-task#73); "
              "the other workers ran its share", flush=True)


def workers_that_died_starting(repo: Path = Path(".")) -> list[int]:
    """Queue workers whose log (of the latest start) ends in celery's 'Unrecoverable error'."""
    died = []
    for log in sorted((repo / WORKERS).glob("dvc-exp-worker-*.out")):
        latest = log.read_text(errors="replace").rsplit("@localhost v", 1)[-1]  # since the last banner
        if "Unrecoverable error" in latest:
            died.append(int(log.stem.rsplit("-", 1)[1]))
    return died


def wait_for_queue(poll_seconds: float = 10, max_failures: int = 5) -> None:
    """Until nothing is queued or running. `dvc queue status` itself can fail now and then (the
    same broker race); a few failures in a row are retried, more are an error."""
    failures = 0
    while True:
        status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True)
        if status.returncode != 0:
            failures += 1
            if failures >= max_failures:
                raise RuntimeError(f"`dvc queue status` failed {failures} times in a row: "
                                   f"{status.stderr.strip()[-300:]}")
        else:
            failures = 0
            if not pending(status.stdout):
                return
        time.sleep(poll_seconds)


def pending(queue_status: str) -> int:
    """How many tasks `dvc queue status` lists as Queued or Running (the last column)."""
    return sum(1 for line in queue_status.splitlines()
               if line.split() and line.split()[-1] in ("Queued", "Running"))


def table(rows=tuple(ROWS), seeds=SEEDS, grid: str = "regularization", prefix: str = "study") -> str:
    from mlflow.tracking import MlflowClient

    from stages import tracking

    params = P.load()
    client = MlflowClient(tracking.tracking_uri(params.mlflow))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`dvc.exp_name` LIKE '{prefix}-%'",
                              max_results=5000) if experiment else []
    by_name = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):  # the latest run of a name wins
        if run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics:
            by_name[run.data.tags["dvc.exp_name"]] = run

    found_by_row = {row: [by_name[exp_name(row, s, prefix)] for s in seeds
                          if exp_name(row, s, prefix) in by_name] for row in rows}
    found_by_row = {row: found for row, found in found_by_row.items() if found}
    # Auxiliary tasks' columns (stages/tasks.py) only when some row has them.
    task_keys = [k for k in ("test_coarse_accuracy", "test_rotation_accuracy")
                 if any(k in r.data.metrics for found in found_by_row.values() for r in found)]
    header = ["technique", "params (on top of the regime)", "seeds", "train accuracy",
              "test accuracy", "gap (train − test)", *(k.replace("_", " ") for k in task_keys),
              "epochs run", "minutes (train + evaluate)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, found in found_by_row.items():
        m = lambda key: [r.data.metrics[key] for r in found]  # noqa: E731
        minutes = [(r.info.end_time - r.info.start_time) / 60000 for r in found]
        changes = ", ".join(f"{k}={v}" for k, v in GRIDS[grid][1][row].items()) or "—"
        cells = [row, changes, str(len(found)), _pm(m("final_train_accuracy")), _pm(m("test_accuracy")),
                 _pm(m("generalization_gap"), " pt"), *(_task_cell(found, k) for k in task_keys),
                 f"{statistics.mean(m('final_epochs_run')):.0f}", f"{statistics.mean(minutes):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _task_cell(runs, key: str) -> str:
    return _pm([r.data.metrics[key] for r in runs]) if all(key in r.data.metrics for r in runs) else "—"


def _pm(values: list[float], unit: str = "%") -> str:
    """mean ± sample standard deviation, in percent (or points); the mean alone for one value."""
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}{unit}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--grid", choices=list(GRIDS), default="regularization",
                        help="regularization (net, 5,000 images), finetune (EfficientNet-Lite0) "
                             "or multitask (auxiliary tasks)")
    parser.add_argument("--source", help="data.source for every run (default: params.yaml's)")
    parser.add_argument("--sha256", help="data.sha256 for every run")
    parser.add_argument("--jobs", type=int, default=1, help="parallel DVC queue workers")
    parser.add_argument("--rows", help="comma-separated rows of the grid (default: all)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--out", type=Path, help="the table's file (default: reports/<prefix>.md, "
                                                 "reports/<prefix>-<grid>.md for another grid)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param over every row (repeatable), e.g. --set train.epochs=5 for "
                             "a quick pass; use it with another --prefix")
    parser.add_argument("--prefix", default="study",
                        help="experiment names <prefix>-<row>-s<seed> (default: study)")
    args = parser.parse_args()
    grid_rows = GRIDS[args.grid][1]
    rows = args.rows.split(",") if args.rows else list(grid_rows)
    unknown = sorted(set(rows) - set(grid_rows))
    if unknown:
        sys.exit(f"error (study): unknown rows {unknown}; the grid has: {', '.join(grid_rows)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error (study): --set {item!r}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(value)  # as in params.yaml: 5 → int, null → None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    table_rows, table_seeds = rows, seeds
    if args.command == "run":
        queue(rows, seeds, args.source, args.sha256, args.grid, extra, args.prefix)
        subprocess.run(["dvc", "queue", "start", "-j", str(args.jobs)], check=True)
        wait_for_queue()
        report_dead_workers()
        # The table of the whole grid as MLflow knows it: a run of a few rows or seeds adds to
        # the table instead of cutting it down to them.
        table_rows, table_seeds = list(grid_rows), sorted(set(SEEDS) | set(seeds))
    text = table(table_rows, table_seeds, args.grid, args.prefix)
    sio.write_text(args.out or default_out(args.prefix, args.grid), text)
    print(text)
    if args.command == "run":  # and every run just made: reports/comparison.md, curves.png, gap.png
        subprocess.run([sys.executable, "-m", "stages.compare", "--exps",
                        ",".join(exp_name(r, s, args.prefix) for r in rows for s in seeds)], check=True)


if __name__ == "__main__":
    main()
