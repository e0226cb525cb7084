"""The regularization study: one DVC experiment per (technique, seed), and a table of the results.

    python -m stages.study run   [--source S --sha256 H] [--jobs N] [--rows a,b] [--seeds 0,1,2]
    python -m stages.study table [--out reports/study.md]

`run` queues the grid with `dvc exp run --queue` (each experiment named study-<row>-s<seed>,
in a temporary workspace, so edits made while it runs can't leak in), runs the queue with
`dvc queue start -j N`, waits for it, then writes the table and, run by run, the comparison
report of `python -m stages.compare`. `table` reads the runs back from
MLflow by their DVC experiment names and prints mean ± std over seeds.

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
OUT = Path("reports/study.md")


def exp_name(row: str, seed: int) -> str:
    return f"study-{row}-s{seed}"


def overrides(row: str, seed: int, source: str | None, sha256: str | None,
              grid: str = "regularization") -> dict:
    regime, rows = GRIDS[grid]
    values = {**regime, **rows[row], "seed": seed}
    if source:
        values["data.source"] = source
    if sha256:
        values["data.sha256"] = sha256
    P.parse(P.with_changes({}, values))  # a typo in the grid fails here, before anything is queued
    return values


def queue(rows, seeds, source, sha256, grid: str = "regularization") -> None:
    """Seed by seed, so that a queue cut short leaves every row with the same seeds."""
    for seed in seeds:
        for row in rows:
            cmd = ["dvc", "exp", "run", "--queue", "-n", exp_name(row, seed)]
            subprocess.run(cmd + P.set_options(overrides(row, seed, source, sha256, grid)), check=True)


def wait_for_queue(poll_seconds: float = 15) -> None:
    while pending(subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout):
        time.sleep(poll_seconds)


def pending(queue_status: str) -> int:
    """How many tasks `dvc queue status` lists as Queued or Running (the last column)."""
    return sum(1 for line in queue_status.splitlines()
               if line.split() and line.split()[-1] in ("Queued", "Running"))


def table(rows=tuple(ROWS), seeds=SEEDS, grid: str = "regularization") -> str:
    from mlflow.tracking import MlflowClient

    from stages import tracking

    params = P.load()
    client = MlflowClient(tracking.tracking_uri(params.mlflow))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`dvc.exp_name` LIKE 'study-%'",
                              max_results=5000) if experiment else []
    by_name = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):  # the latest run of a name wins
        if run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics:
            by_name[run.data.tags["dvc.exp_name"]] = run

    lines = ["| technique | params (on top of the regime) | seeds | train accuracy | test accuracy | gap (train − test) | test coarse accuracy | test rotation accuracy | epochs run | minutes (train + evaluate) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        found = [by_name[exp_name(row, s)] for s in seeds if exp_name(row, s) in by_name]
        if not found:
            continue
        m = lambda key: [r.data.metrics[key] for r in found]  # noqa: E731
        minutes = [(r.info.end_time - r.info.start_time) / 60000 for r in found]
        changes = ", ".join(f"{k}={v}" for k, v in GRIDS[grid][1][row].items()) or "—"
        lines.append(f"| {row} | {changes} | {len(found)} | {_pm(m('final_train_accuracy'))} | "
                     f"{_pm(m('test_accuracy'))} | {_pm(m('generalization_gap'), ' pt')} | "
                     f"{_task_cell(found, 'test_coarse_accuracy')} | {_task_cell(found, 'test_rotation_accuracy')} | "
                     f"{statistics.mean(m('final_epochs_run')):.0f} | {statistics.mean(minutes):.1f} |")
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
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    grid_rows = GRIDS[args.grid][1]
    rows = args.rows.split(",") if args.rows else list(grid_rows)
    unknown = sorted(set(rows) - set(grid_rows))
    if unknown:
        sys.exit(f"error (study): unknown rows {unknown}; the grid has: {', '.join(grid_rows)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    if args.command == "run":
        queue(rows, seeds, args.source, args.sha256, args.grid)
        subprocess.run(["dvc", "queue", "start", "-j", str(args.jobs)], check=True)
        wait_for_queue()
    text = table(rows, seeds, args.grid)
    sio.write_text(args.out, text)
    print(text)
    if args.command == "run":  # and every single run: reports/comparison.md, curves.png, gap.png
        subprocess.run([sys.executable, "-m", "stages.compare", "--exps",
                        ",".join(exp_name(r, s) for r in rows for s in seeds)], check=False)


if __name__ == "__main__":
    main()
