"""A sweep grid's points through the stages' own main() functions, several at a time, without DVC
or MLflow: for a GPU machine that has neither.

    python benchmarks/gpu_sweep.py --grid finetune-hires --prefix ft [--seeds 0,1]
                                   [--techniques a,b] [--set key=value ...] [--workers 4]
                                   [--out reports] [--journal data/gpu-sweep/<prefix>/journal]

Every point of the plan stages/experiments/plans/<grid>.yaml (the same names and params as
`python -m stages.experiments.engine run --grid <grid>` would queue) runs in a folder of its own under
data/gpu-sweep/<prefix>/<name>/, as `dvc repro` would run it: params.yaml written there, then
augment.main(), train.main() and evaluate.main() — the stages' own code, unchanged. They log
their run as they always do, to the tracking URI `journal:<--journal>` (stages/tracking/journal.py:
no MLflow needed), named like the DVC experiment the engine would queue. Copy that folder to a
machine with MLflow and `python -m stages.tracking.replay <folder>` makes them MLflow runs.
The download stage runs once, in the repository (the bundled CIFAR-10 by default).

`--workers` points run at once, each its own process on the same GPU (a tiny network leaves
most of an H200 idle; several processes fill it). Writes <out>/<prefix>-runs.json (every point's
params, train and evaluate metrics, journaled run id and seconds, as each finishes) and the path
report of stages/experiments/reports/path.py from those runs: <out>/<prefix>-path.md,
-chosen.json and figures.

Points run before the stages journaled their runs (the committed reports/gpu/*-runs.json have no
run ids): `--journal-records` only writes each such record into the journal, as a run of what it
holds (params, train's final metrics, evaluate's metrics and verdict; no per-epoch curves,
artifacts or model: those stayed on the GPU machine), its id made from the record's file and
name, so that the replay puts it into MLflow once:

    python benchmarks/gpu_sweep.py --grid learning-curve --prefix curve --out reports/gpu \
        --journal-records
    python -m stages.tracking.replay data/gpu-sweep/curve/journal
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import io as sio, params as P  # noqa: E402
from stages.experiments import plan as plans  # noqa: E402
from stages.experiments.reports import path as report  # noqa: E402

WORK = REPO / "data" / "gpu-sweep"


def run_point(job: tuple[str, dict, str, Path]) -> dict:
    """One point in its own folder: augment, train, evaluate; their metrics, or the error that
    stopped it (the other points go on)."""
    try:
        return run_stages(*job)
    except BaseException as exc:  # a stage's SystemExit too
        return {"name": job[0], "changes": job[1], "error": f"{type(exc).__name__}: {exc}"}


def run_stages(name: str, changes: dict, prefix: str, journal: Path) -> dict:
    """augment, train and evaluate in the point's own folder (this worker process's alone)."""
    folder = WORK / prefix / name
    (folder / "data").mkdir(parents=True, exist_ok=True)
    raw = folder / "data" / "raw"
    if not raw.exists():
        raw.symlink_to(REPO / "data" / "raw")
    params = P.with_changes(P.read_yaml(REPO / "params.yaml"), changes)
    P.parse(params)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.chdir(folder)
    # What DVC would set for the experiment: its name names the run (and its dvc.exp_name tag),
    # so the replayed runs are found by name as the engine's are. The run goes to the journal.
    os.environ["DVC_EXP_NAME"] = name
    os.environ["MLFLOW_TRACKING_URI"] = f"journal:{journal}"
    from stages import augment, evaluate, train

    seconds = {}
    with (
        open(folder / "log.txt", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        for stage in (augment, train, evaluate):
            start = time.perf_counter()
            stage.main()
            seconds[stage.__name__.split(".")[-1]] = time.perf_counter() - start
    return {
        "name": name,
        "changes": changes,
        "params": {k: str(v) for k, v in P.flatten(P.parse(params)).items()},
        "train": sio.read_json(folder / "metrics" / "train.json"),
        "evaluate": sio.read_json(folder / "metrics" / "eval.json"),
        "run_id": sio.read_json(folder / "models" / "run.json")["run_id"],
        "seconds": seconds,
    }


def journal_records(records: list[dict], journal: Path, source: str) -> int:
    """The records of points run before they were journaled (they have no run_id) as journaled
    runs of what a record holds: the params, train's final metrics, evaluate's metrics and
    verdict; no curves, artifacts or model (those stayed on the GPU machine). Each run's id is
    made from the record's file and name, so doing it again gives the same runs, which replay
    then skips. Returns how many runs were written."""
    from stages.tracking import journal as journaled

    written = 0
    for record in records:
        run_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{source}#{record['name']}").hex
        if "run_id" in record or (journal / run_id).exists():
            continue
        run = journaled.start(
            f"journal:{journal}",
            record["params"]["mlflow.experiment"],
            record["name"],
            {"dvc.exp_name": record["name"], "gpu_sweep.record": source},
            record["params"],
            run_id=run_id,
        )
        train, evaluate = record["train"], record["evaluate"]
        now = journaled.now()
        run.log_metrics({f"final_{k}": v for k, v in train.items() if is_number(v)}, None, now)
        run.log_metrics(  # what evaluate.log_to_run logs
            {
                **{
                    k: v
                    for k, v in evaluate.items()
                    if k.startswith(("test_", "wise_")) and is_number(v)
                },
                "generalization_gap": evaluate["generalization_gap"],
                "overfitting_epoch": evaluate["overfitting_epoch"] or 0,
                **{f"test_accuracy.{c}": v for c, v in evaluate["per_class_accuracy"].items()},
            },
            None,
            now,
        )
        for row in evaluate.get("wise_curve", {}).values():
            run.log_metrics(
                {
                    "wise_curve_val_accuracy": row["val_accuracy"],
                    "wise_curve_test_accuracy": row["test_accuracy"],
                },
                round(100 * row["alpha"]),
                now,
            )
        tags = {"verdict": evaluate["verdict"]}
        if "wise_fine_tuned_best" in evaluate:
            tags["wise_fine_tuned_best"] = str(evaluate["wise_fine_tuned_best"]).lower()
        run.set_tags(tags)
        run.write({"kind": "end", "status": "FINISHED", "time": journaled.now()})
        written += 1
    return written


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_mlflow_run(record: dict) -> SimpleNamespace:
    """A record in the shape path.py reads MLflow runs in."""
    metrics = {f"final_{k}": v for k, v in record["train"].items() if isinstance(v, (int, float))}
    metrics.update({k: v for k, v in record["evaluate"].items() if isinstance(v, (int, float))})
    tags = {"dvc.exp_name": record["name"]}
    return SimpleNamespace(
        data=SimpleNamespace(params=record["params"], metrics=metrics, tags=tags)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--seeds", help="comma-separated (default: the grid's)")
    parser.add_argument("--techniques", help="comma-separated (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "reports")
    parser.add_argument(
        "--journal",
        type=Path,
        help="where the runs are journaled (default: data/gpu-sweep/<prefix>/journal)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only the report, from <out>/<prefix>-runs.json"
    )
    parser.add_argument(
        "--journal-records",
        action="store_true",
        help="only journal the records of <out>/<prefix>-runs.json that predate the journal",
    )
    args = parser.parse_args()

    base = P.read_yaml(REPO / "params.yaml")
    plan = plans.load(args.grid, base)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(plan.seeds)
    techniques = plans.select(plan, args.techniques)
    extra = plans.parse_sets(args.set)
    todo = plans.experiments(plan, techniques, seeds, args.prefix, extra, base)

    os.chdir(REPO)  # a relative --out or --journal is under the repository
    out = args.out / f"{args.prefix}-runs.json"
    records = json.loads(out.read_text()) if out.exists() else []
    done = {r["name"] for r in records}
    journal = (args.journal or WORK / args.prefix / "journal").resolve()
    if args.journal_records:
        written = journal_records(records, journal, out.name)
        print(f"{written} records journaled: python -m stages.tracking.replay {journal}")
        return
    if not args.report_only and not (REPO / "data" / "raw" / "meta.json").exists():
        from stages import download

        download.main()
    jobs = [(name, changes, args.prefix, journal) for name, changes in todo if name not in done]
    if args.report_only:
        jobs = []
    print(f"{len(jobs)} points to run, {args.workers} at a time", flush=True)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, maxtasksperchild=1) as pool:
        for record in pool.imap_unordered(run_point, jobs):
            if "error" in record:
                print(f"{record['name']}: FAILED: {record['error']}", flush=True)
                continue
            records.append(record)
            sio.write_json(out, records)
            print(
                f"{record['name']}: test {100 * record['evaluate']['test_accuracy']:.1f}%, "
                f"{sum(record['seconds'].values()):.0f} s "
                f"({time.perf_counter() - start:.0f} s in)",
                flush=True,
            )
    by_name = {r["name"]: as_mlflow_run(r) for r in records}
    files, _, _ = report.write_report(plan, by_name, args.prefix, args.out)
    print("wrote", ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
