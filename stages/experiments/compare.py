"""Compare runs side by side: reports/comparison.md, reports/curves.png, reports/gap.png.

    python -m stages.experiments.compare                          # every finished run of mlflow.experiment
    python -m stages.experiments.compare --exps exp-a,exp-b       # the MLflow runs of these DVC experiments
    python -m stages.experiments.compare --experiment other --out reports/other
    python -m stages.experiments.compare --prefix sweep           # the runs of DVC experiments sweep-…:
                                                                  # reports/sweep-comparison.md, -curves.png, -gap.png

The table has one row per run: its name (the DVC experiment's, when it came from one), the params
whose values differ between the runs, train / validation / test accuracy (percent), the gap
(points), the best epoch, the epochs run, the minutes it took and the verdict; multi-task runs add
their auxiliary tasks' test accuracy (coarse acc, rotation acc). curves.png overlays the
validation accuracy per epoch; gap.png shows each run's generalization gap, its value on its bar.

Honest axes: accuracy on the whole 0-100% range and the gap on a range at least 10 points wide
around 0, so that a run at chance (10.00% vs 10.02%) looks flat, not like a trend.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages import io as sio, params as P
from stages.experiments import reports
from stages.tracking import store


def find_runs(client, experiment: str, exps: list[str] | None, prefix: str | None = None):
    """The finished, evaluated runs of `exps` (DVC experiment names, in that order), else those
    named `<prefix>-…`, else every one of the MLflow experiment; oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(
            f"error (compare): no MLflow experiment named {experiment!r} in {client.tracking_uri}"
        )
    by_name = reports.finished_runs(client, found.experiment_id, None if exps else prefix)
    if exps:
        missing = [e for e in exps if e not in by_name]
        if missing:
            sys.exit(f"error (compare): no finished MLflow run for DVC experiments {missing}")
        return [by_name[e] for e in exps]
    if not by_name:
        named = f" named {prefix}-…" if prefix else ""
        sys.exit(
            f"error (compare): experiment {experiment!r} has no finished, evaluated runs{named}"
        )
    return sorted(by_name.values(), key=lambda r: r.info.start_time)


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
            percent(m.get("final_train_accuracy")),
            percent(m.get("final_val_accuracy")),
            percent(m["test_accuracy"]),
            *(percent(m[k]) if k in m else "" for k in task_keys),
            points(m.get("generalization_gap")),
            f"{m.get('final_best_epoch', 0):.0f}",
            f"{m.get('final_epochs_run', 0):.0f}",
            f"{minutes:.1f}",
            r.data.tags.get("verdict", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"


def points(fraction: float | None) -> str:
    """A difference of accuracies, in percentage points, signed."""
    return "—" if fraction is None else f"{100 * fraction:+.1f} pt"


MIN_GAP_SPAN = 10  # points: the gap axis is never narrower, so noise of 0.01 pt looks like noise


def gap_limits(gaps: list[float]) -> tuple[float, float]:
    """The gap axis (points): 0 and every bar inside, padded by 10% of the span for the value
    labels, and at least MIN_GAP_SPAN wide."""
    lo, hi = min(0.0, *gaps), max(0.0, *gaps)
    pad = max(0.1 * (hi - lo), (MIN_GAP_SPAN - (hi - lo)) / 2, 0)
    return lo - pad, hi + pad


LEGEND_INSIDE = 8  # runs: more than this, and the legend goes to the right of the plot


def plots(client, runs, out: Path, prefix: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    many = len(runs) > LEGEND_INSIDE
    fig, ax = plt.subplots(figsize=(11 if many else 8, 4.5))
    for r in runs:
        history = sorted(
            client.get_metric_history(r.info.run_id, "val_accuracy"), key=lambda m: m.step
        )
        ax.plot(
            [m.step for m in history],
            [100 * m.value for m in history],
            label=r.info.run_name,
            lw=1,
            marker="o" if len(history) < 3 else None,  # a one-epoch run is a dot, not nothing
        )
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy per epoch")
    ax.set_ylim(0, 100)  # the whole range: 10% (chance) to 100%
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + len(runs) // 25)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    sio.save_figure(out / named("curves.png", prefix), fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(runs) + 1)))
    names = [r.info.run_name for r in runs]
    gaps = [100 * r.data.metrics.get("generalization_gap", 0.0) for r in runs]
    bars = ax.barh(names, gaps, color=["tab:red" if g > 0 else "tab:blue" for g in gaps])
    ax.bar_label(bars, labels=[f"{g:+.1f}" for g in gaps], padding=3, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(*gap_limits(gaps))
    ax.invert_yaxis()
    ax.set(
        xlabel="generalization gap: train − test accuracy (percentage points)",
        title="gap per run",
    )
    ax.tick_params(axis="y", labelsize=8 if len(runs) <= 20 else 6)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    sio.save_figure(out / named("gap.png", prefix), fig)
    plt.close(fig)


def named(file: str, prefix: str | None) -> str:
    """comparison.md, or <prefix>-comparison.md."""
    return f"{prefix}-{file}" if prefix else file


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: mlflow.experiment)")
    parser.add_argument("--exps", help="comma-separated DVC experiment names")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument(
        "--prefix",
        help="the runs of DVC experiments <prefix>-… (unless --exps names them), in files "
        "<prefix>-comparison.md, <prefix>-curves.png, <prefix>-gap.png",
    )
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    params = P.load()
    client = MlflowClient(store.tracking_uri(params.mlflow))
    runs = find_runs(
        client,
        args.experiment or params.mlflow.experiment,
        args.exps.split(",") if args.exps else None,
        args.prefix,
    )
    files = [named(f, args.prefix) for f in ("comparison.md", "curves.png", "gap.png")]
    sio.write_text(args.out / files[0], table(runs))
    plots(client, runs, args.out, args.prefix)
    print(f"compare: {len(runs)} runs → {args.out}/{files[0]}, {files[1]}, {files[2]}")


if __name__ == "__main__":
    main()
