"""A sweep: each technique of a grid at a range of strengths, as queued DVC experiments.

    python -m stages.experiments.sweep run    [--grid sweep] [--techniques a,b] [--seeds 0,1]
                                              [--set key=value ...] [--prefix sweep] [--jobs N]
                                              [--shard i/n] [--push GIT_REMOTE]
    python -m stages.experiments.sweep report [--grid sweep] [--prefix sweep]

The grid is stages/experiments/grids/<grid>.yaml: the `regime` every point starts from, the
`seeds`, `baseline` (default true: the regime alone, once per seed, is the shared baseline
<prefix>-baseline-s<seed>) and the `techniques`, each {param, values | points, scale, with}.
Every point is the committed params.yaml + regime + the technique's `with` + its point + its
seed (+ --set over all of them), named <prefix>-<technique>-<label>-s<seed> with label =
f"{value:g}" for numbers, `none` for null, `true`/`false`.

Every point is checked against the params schema before anything is queued. `run` queues the
points seed by seed (a queue cut short leaves every point with the same seeds), runs them with
`dvc queue start -j N`, prints a line for each as it ends, and then builds the report
(stages/experiments/path.py). `--shard i/n` runs only the i-th of n disjoint parts of the point
list, for n machines sharing one tracking server; `--push <git remote>` then shares the finished
experiments and their outputs (`dvc exp push`, to the git remote and the default DVC remote).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from stages import params as P
from stages.errors import ParamsError
from stages.experiments import dvcqueue, study
from stages.experiments.sweepgrid import Sweep, label, load


def points(
    sweep: Sweep,
    techniques: list[str],
    seeds: list[int],
    prefix: str = "sweep",
    extra: dict | None = None,
) -> list[tuple[str, dict]]:
    """(experiment name, params changes) of every point, seed by seed, the baseline first."""
    found, extra = [], extra or {}
    for seed in seeds:
        if sweep.baseline:
            found.append((f"{prefix}-baseline-s{seed}", {**sweep.regime, "seed": seed, **extra}))
        for technique in techniques:
            param, changes = sweep.techniques[technique]
            for point in changes:
                name = f"{prefix}-{technique}-{label(point[param])}-s{seed}"
                found.append((name, {**sweep.regime, **point, "seed": seed, **extra}))
    return found


def check(todo: list[tuple[str, dict]], base: dict) -> None:
    """Each point on top of `base` (the committed params.yaml) must be valid params."""
    for name, changes in todo:
        try:
            P.parse(P.with_changes(base, changes))
        except ParamsError as exc:
            raise ParamsError(f"{name}: {exc}") from None


def shard(todo: list, spec: str | None) -> list:
    """The i-th of n parts (--shard i/n, i from 1): every n-th point from the i-th, so that each
    part keeps the seed-by-seed order and a similar mix of techniques. The same arguments on
    every machine give the same point list, so the n parts cover it exactly once."""
    if not spec:
        return todo
    i, sep, n = spec.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise ParamsError(f"--shard {spec!r}: expected i/n with 1 <= i <= n, e.g. 1/3")
    return todo[int(i) - 1 :: int(n)]


def select(sweep: Sweep, names: str | None) -> list[str]:
    techniques = names.split(",") if names else list(sweep.techniques)
    unknown = [t for t in techniques if t not in sweep.techniques]
    if unknown:
        raise ParamsError(
            f"unknown technique {', '.join(unknown)}; the grid has: {', '.join(sweep.techniques)}"
        )
    return techniques


def report(grid: str, prefix: str, force: bool = False) -> bool:
    """The sweep's report, from the tracking server's runs (wherever they ran); False, with one
    line saying why, when none was built."""
    from mlflow.exceptions import MlflowException  # imported here: MLflow is slow to import

    from stages.experiments import path

    try:
        print(f"sweep: report: {path.build(grid_name=grid, prefix=prefix, force=force)}")
        return True
    except (ParamsError, MlflowException, OSError) as exc:  # e.g. nothing finished; server down
        print(f"sweep: no report: {(str(exc).splitlines() or [repr(exc)])[0]}")
        return False


def push(remote: str, names: list[str]) -> None:
    """Share finished experiments: their git refs to `remote`, their outputs to the default DVC
    remote (dvc exp push does both)."""
    if names:
        subprocess.run(["dvc", "exp", "push", remote, *names], check=True)


def main() -> None:
    args = parse_args()
    try:
        sweep = load(args.grid)
        if args.command == "run":
            study.check_committed_params()
            techniques = select(sweep, args.techniques)
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(sweep.seeds)
            todo = points(sweep, techniques, seeds, args.prefix, study.parse_sets(args.set))
            check(todo, P.read_yaml())
            todo = shard(todo, args.shard)
    except ParamsError as exc:
        sys.exit(f"error (sweep): {exc}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    failed = []
    if args.command == "run":
        print(f"sweep: {len(todo)} experiments, {args.jobs} worker(s)", flush=True)
        failed = dvcqueue.run(todo, args.jobs, "sweep")
        if args.push:
            push(args.push, [name for name, _ in todo if name not in failed])
    reported = report(args.grid, args.prefix, args.force)  # of what finished, even when some failed
    dvcqueue.exit_if_failed(failed, "sweep")
    if args.command == "report" and not reported:
        sys.exit(1)  # asked for a report, got none (the line above says why)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--grid", default="sweep", help="a grid of stages/experiments/grids/")
    parser.add_argument("--techniques", help="comma-separated techniques (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    study.add_set_option(parser, "point")
    parser.add_argument(
        "--prefix", default="sweep", help="experiment names <prefix>-<technique>-<value>-s<seed>"
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel DVC queue workers")
    parser.add_argument(
        "--force", action="store_true", help="replace a committed report even with fewer runs"
    )
    parser.add_argument("--shard", help="i/n: run only the i-th of n parts (one per machine)")
    parser.add_argument(
        "--push", metavar="GIT_REMOTE", help="then dvc exp push the finished experiments there"
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
