"""Compare runs side by side: reports/comparison.md, reports/curves.png, reports/gap.png.

    python -m stages.experiments.compare                          # every finished run of mlflow.experiment
    python -m stages.experiments.compare --exps exp-a,exp-b       # the MLflow runs of these DVC experiments
    python -m stages.experiments.compare --experiment other --out reports/other

The table has one row per run: its name (the DVC experiment's, when it came from one), the params
whose values differ between the runs, train / validation / test accuracy, the gap, the best epoch,
the epochs run, the minutes it took and the verdict; multi-task runs add their auxiliary tasks'
test accuracy (coarse acc, rotation acc). curves.png overlays the validation accuracy
per epoch; gap.png shows each run's generalization gap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages import io as sio, params as P
from stages.tracking import store


def find_runs(client, experiment: str, exps: list[str] | None):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(
            f"error (compare): no MLflow experiment named {experiment!r} in {client.tracking_uri}"
        )
    runs = client.search_runs(
        [found.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    runs = [r for r in runs if "test_accuracy" in r.data.metrics]
    if exps:
        by_name = {r.data.tags.get("dvc.exp_name", r.info.run_name): r for r in runs}  # latest wins
        missing = [e for e in exps if e not in by_name]
        if missing:
            sys.exit(f"error (compare): no finished MLflow run for DVC experiments {missing}")
        runs = [by_name[e] for e in exps]
    if not runs:
        sys.exit(f"error (compare): experiment {experiment!r} has no finished, evaluated runs")
    return runs


def differing_params(runs) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    return [
        k
        for k in keys
        if len({r.data.params.get(k) for r in runs}) > 1 and not k.startswith("mlflow.")
    ]


TASK_METRICS = (
    "test_coarse_accuracy",
    "test_rotation_accuracy",
)  # multi-task runs (stages/networks/tasks.py)


def table(runs) -> str:
    keys = differing_params(runs)
    task_keys = [k for k in TASK_METRICS if any(k in r.data.metrics for r in runs)]
    header = [
        "run",
        *keys,
        "train acc",
        "val acc",
        "test acc",
        *(k[len("test_") :].replace("_accuracy", " acc") for k in task_keys),
        "gap",
        "best epoch",
        "epochs",
        "minutes",
        "verdict",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m = r.data.metrics
        minutes = (r.info.end_time - r.info.start_time) / 60000 if r.info.end_time else float("nan")
        cells = [
            r.info.run_name,
            *(r.data.params.get(k, "") for k in keys),
            f"{m.get('final_train_accuracy', float('nan')):.3f}",
            f"{m.get('final_val_accuracy', float('nan')):.3f}",
            f"{m['test_accuracy']:.3f}",
            *(f"{m[k]:.3f}" if k in m else "" for k in task_keys),
            f"{m.get('generalization_gap', float('nan')):+.3f}",
            f"{m.get('final_best_epoch', 0):.0f}",
            f"{m.get('final_epochs_run', 0):.0f}",
            f"{minutes:.1f}",
            r.data.tags.get("verdict", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(client, runs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        history = sorted(
            client.get_metric_history(r.info.run_id, "val_accuracy"), key=lambda m: m.step
        )
        ax.plot([m.step for m in history], [m.value for m in history], label=r.info.run_name, lw=1)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per epoch")
    ax.grid(alpha=0.3)
    if len(runs) <= 20:
        ax.legend(fontsize=6)
    fig.tight_layout()
    sio.save_figure(out / "curves.png", fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(runs) + 1)))
    names = [r.info.run_name for r in runs]
    ax.barh(names, [r.data.metrics.get("generalization_gap", 0.0) for r in runs])
    ax.invert_yaxis()
    ax.set(xlabel="generalization gap (train − test accuracy)", title="gap per run")
    ax.tick_params(axis="y", labelsize=6)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    sio.save_figure(out / "gap.png", fig)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: mlflow.experiment)")
    parser.add_argument("--exps", help="comma-separated DVC experiment names")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    params = P.load()
    client = MlflowClient(store.tracking_uri(params.mlflow))
    runs = find_runs(
        client,
        args.experiment or params.mlflow.experiment,
        args.exps.split(",") if args.exps else None,
    )
    sio.write_text(args.out / "comparison.md", table(runs))
    plots(client, runs, args.out)
    print(f"compare: {len(runs)} runs → {args.out}/comparison.md, curves.png, gap.png")


if __name__ == "__main__":
    main()
