"""The one command for plans of experiments: a study, a regularization path, a joint search.

    python -m stages.experiments.engine run    --grid NAME [--jobs N] [--prefix P] [--seeds 0,1]
                                               [--rows a,b | --techniques a,b] [--set key=value ...]
                                               [--trials N] [--storage URL] [--shard i/n]
                                               [--push GIT_REMOTE] [--force] [--out DIR]
                                               [--without-dvc [--journal FOLDER]]
    python -m stages.experiments.engine report --grid NAME [--prefix P] [--storage URL] [--force]
                                               [--out DIR] [--without-dvc [--journal FOLDER]]

NAME is a plan of stages/experiments/plans/ (stages/experiments/plan.py: its format, checks and
names). Every experiment is a DVC experiment, queued with `dvc exp run --queue` in a temporary
workspace and run by `dvc queue start -j N` (a line per experiment as it ends), and one MLflow
run, nested under the pass's parent run (tag sweep.prefix) by the report.

- A study (rows) or a path (techniques): the chosen rows or techniques × seeds, seed by seed;
  then the report of everything MLflow has under the prefix — the study's table
  (reports/<prefix>-<plan>.md, or the plan's `report:` file) or the path
  (reports/<prefix>-path.md, figures, -chosen.json).
  `--shard i/n` runs the i-th of n disjoint parts of the list (one per machine); with
  `--storage`, the workers sharing it take the next point nobody has taken instead (take_points);
  `--push` shares the finished experiments (`dvc exp push`).
- A search (space): `--trials N` trials in all, counted in the Optuna study `<prefix>` of
  `--storage` (default: optuna.db at the repository root), so that running the command again
  continues the study. Its sampler is TPE, seeded; its pruner stops a trial at the epoch where its
  validation accuracy falls behind (Hyperband by default; stages/tracking/trial.py is the train
  stage's side). `--jobs` trials run at once. A pruned trial is recorded as pruned (MLflow tag
  optuna.pruned, DVC metric `pruned`), not as a failure. Once N trials have ended, the best
  trial's recipe is rerun unpruned with the other seeds of the plan's `search.seeds_of_the_best`
  (`<prefix>-t<n>-s<seed>`), and the report (reports/<prefix>-search.md) is written.

`--without-dvc` (a machine without DVC or MLflow, e.g. a GPU machine with only PyTorch): the
same experiments, names and reports, but each experiment runs in a folder of its own,
data/without-dvc/<prefix>/<name>/, through the stages' own main() (stages/experiments/folders.py),
`--jobs` at once, and its run is written to the journal `--journal` (default
data/without-dvc/<prefix>/journal) instead of MLflow; mlflow and dvc are never imported.
Experiments the journal holds finished are skipped when the command runs again; `report` reads the
journal. `python -m stages.tracking.replay <journal>` makes the runs MLflow runs later, and
`report` without `--without-dvc` then nests them under the pass's parent run.

Everything is checked before anything is queued: every row, point and both ends of every
distribution against the params schema, params.yaml against the committed one, the storage, and
that a study of that name was made with the same space. One line each.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from stages import params as P
from stages.errors import ParamsError
from stages.experiments import dvcqueue, folders, plan as plans
from stages.runtime import repo_root
from stages.tracking import trial as trials

TOOL = "engine"


def default_storage() -> str:
    return f"sqlite:///{repo_root() / 'optuna.db'}"


# --- grids: a study or a path ----------------------------------------------------------------


def shard(todo: list, spec: str | None) -> list:
    """The i-th of n parts (--shard i/n, i from 1): every n-th experiment from the i-th, so that
    each part keeps the seed-by-seed order. The same arguments on every machine give the same
    list, so the n parts cover it exactly once."""
    if not spec:
        return todo
    i, sep, n = spec.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise ParamsError(f"--shard {spec!r}: expected i/n with 1 <= i <= n, e.g. 1/3")
    return todo[int(i) - 1 :: int(n)]


def run_grid(todo: list[tuple[str, dict]], args) -> list[str]:
    """Queue and run the experiments; the names of those that failed."""
    if args.without_dvc:  # no run cache restores a finished one: the journal says what's done
        journaled = finished_runs(args.prefix_used, args)
        done = [name for name, _ in todo if name in journaled]
        if done:
            print(f"{TOOL}: {len(done)} experiments finished before (journal): skipped")
        todo = [(name, changes) for name, changes in todo if name not in done]
    if args.shared:
        failed = take_points(todo, args.prefix_used, args)
    else:
        print(f"{TOOL}: {len(todo)} experiments, {args.jobs} worker(s)", flush=True)
        failed = args.runner.run(todo, args.jobs, TOOL)
    finished = [name for name, _ in todo if name not in failed]
    if args.push and finished:  # git refs to the remote, outputs to the default DVC remote
        subprocess.run(["dvc", "exp", "push", args.push, *finished], check=True)
    return failed


@contextmanager
def claiming(url: str) -> Iterator[None]:
    """One worker at a time takes a point. A database server does this itself (Optuna takes a
    waiting trial under a row lock); on a SQLite file, two processes can take the same one, so
    a file lock beside it orders them."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with open(url[len("sqlite:///") :] + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def take_points(todo: list[tuple[str, dict]], prefix: str, args) -> list[str]:
    """Workers on one machine or many sharing one --storage: each experiment is a trial of one
    Optuna study; each worker takes the next point nobody has taken (the lower trial number wins
    when two take one at once), --jobs at a time, runs them and tells how they ended, until every
    point is taken, so a slow or dead machine holds up nothing (a dead worker's heartbeats stop,
    and its points are taken again). The names that failed here."""
    import hashlib

    import optuna
    from optuna.trial import TrialState

    names, changes = [n for n, _ in todo], dict(todo)
    key = hashlib.sha256(json.dumps(todo, sort_keys=True, default=str).encode()).hexdigest()[:8]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(args.storage)
    study = optuna.create_study(
        study_name=f"{prefix}-grid-{key}",
        storage=storage,
        load_if_exists=True,
    )

    study_id = storage.get_study_id_from_name(study.study_name)

    def taken() -> dict[str, int]:
        return points_taken(storage, study_id)

    failed = []
    print(
        f"{TOOL}: {len(todo)} experiments in {study.study_name}, {args.jobs} at a time", flush=True
    )
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's points: taken again
        if set(taken()) >= set(names):
            return failed
        batch = {}
        for _ in range(args.jobs):
            with claiming(args.storage):
                free = [n for n in names if n not in taken() and n not in batch]
                if not free:
                    break
                study.enqueue_trial({"experiment": free[0]})
                trial = study.ask()
                name = trial.suggest_categorical("experiment", names)
            if taken().get(name, trial.number) != trial.number or name in batch:
                study.tell(trial, state=TrialState.FAIL)  # another worker took it first
                continue
            batch[name] = trial
        if not batch:
            continue
        with beating(storage, [t._trial_id for t in batch.values()]):
            failed_now = args.runner.run([(n, changes[n]) for n in batch], args.jobs, TOOL)
        for name, trial in batch.items():
            if name in failed_now:
                trial.set_user_attr("experiment_failed", True)
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, 0.0)  # done: the report reads the results from MLflow
        failed += failed_now


def points_taken(storage, study_id: int) -> dict[str, int]:
    """{name: trial number} of a grid's points running, done, or failed in their experiment.
    Read from the database itself, not through the study's cache: Optuna's cache rereads only the
    trials above the highest finished one it has seen, and on a database server a trial can
    become visible after a higher-numbered one has finished (two workers taking points at once on
    a loaded machine commit in either order); the cache would never see it, and its point would
    run twice."""
    from optuna.trial import TrialState

    found = {}
    for t in storage.get_all_trials(study_id, deepcopy=False):
        ran = t.state in (TrialState.RUNNING, TrialState.COMPLETE) or (
            t.state == TrialState.FAIL and t.user_attrs.get("experiment_failed")
        )
        if ran and "experiment" in t.params:
            found.setdefault(t.params["experiment"], t.number)
    return found


# --- a search --------------------------------------------------------------------------------


def space_key(plan: plans.Plan) -> str:
    """The space as the study remembers it: another space under the same name is refused."""
    return json.dumps([asdict(d) for d in plan.space], sort_keys=True)


HEARTBEAT_SECONDS = 60  # how often a worker says that its trials are still running
GRACE_SECONDS = 900  # a trial silent this long is taken for dead: failed, its params tried again


def storage_for(url: str, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS):
    """Optuna's RDB storage (SQLite, PostgreSQL, …) with heartbeats: a trial whose worker has
    not beaten for `grace` seconds (a killed process or machine) is failed by the next worker
    that looks, and its params queued again (RetryHeartbeatStaleTrialCallback)."""
    import optuna
    import sqlalchemy

    # The heartbeat and its retry are marked experimental, and Optuna expects heartbeats with its
    # own study.optimize(), which the engine doesn't use (each trial is a DVC experiment): the
    # warnings say nothing a user can act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    # Workers starting at once on a new storage all make its tables (and its version row): the
    # losers fail on "already exists". One that tried again at once would race the winner on its
    # next table, so a loser waits a moment, by a random amount so that losers don't meet again.
    attempts = 20
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3
                ),
            )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
            lost_a_race = any(
                words in str(exc) for words in ("already exists", "UNIQUE", "duplicate key")
            )
            if not lost_a_race or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5))  # seconds


@contextmanager
def beating(storage, trial_ids: list[int]) -> Iterator[None]:
    """The trials' heartbeats, from a thread, while their experiments run."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(storage.heartbeat_interval):
            for trial_id in trial_ids:
                storage.record_heartbeat(trial_id)

    for trial_id in trial_ids:  # the first beat before anything runs: a trial is never unbeaten
        storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def open_study(plan: plans.Plan, prefix: str, storage: str, extra: dict | None = None):
    """The study `prefix` in `storage`, made now or before with this plan's space, with the
    plan's pruner (the trials' train stages use the same). One line when the storage can't be
    reached or the study holds another space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = trials.make_pruner(**pruner_args(plan, extra or {}))
    try:
        study = optuna.create_study(
            study_name=prefix,
            storage=storage_for(storage),
            pruner=pruner,
            direction="maximize",
            load_if_exists=True,
        )
    except Exception as exc:  # SQLAlchemy's errors: a bad URL, a server that doesn't answer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ParamsError(f"--storage {storage}: {first[:200]}") from None
    known = study.user_attrs.get("space")
    if known is None:
        study.set_user_attr("space", space_key(plan))
        study.set_user_attr("plan", plan.name)
        if plan.search.get("first"):  # tried before anything is drawn (its other params drawn)
            study.enqueue_trial(plan.search["first"])
    elif known != space_key(plan):
        raise ParamsError(
            f"the study {prefix!r} in {storage} was made with another space "
            f"(plan {study.user_attrs.get('plan')!r}): give another --prefix"
        )
    # A study that goes on (a second run of the command, another worker) draws on from a seed of
    # its own: the plan's seed again would replay the first trials' random points, and DVC's run
    # cache would then restore those trials' outputs instead of training a new one.
    study.sampler = optuna.samplers.TPESampler(
        seed=plan.search["seed"] + len(study.trials),
        multivariate=True,
        group=True,
        constant_liar=True,
    )
    return study


def pruner_args(plan: plans.Plan, extra: dict) -> dict:
    """The pruner's settings; its budget is the most epochs a trial may train: train.epochs of
    --set or the regime, or the largest the space may draw."""
    epochs = extra.get("train.epochs", plan.regime.get("train.epochs"))
    drawn = [d for d in plan.space if d.param == "train.epochs"]
    if epochs is None and drawn:
        d = drawn[0]
        epochs = max(d.args) if d.kind == "categorical" else int(d.args[1])
    if epochs is None:
        raise ParamsError(
            f"plan {plan.name!r}: a search sets train.epochs in its regime or its space"
        )
    return {
        "kind": plan.search["pruner"],
        "min_epochs": plan.search["min_epochs"],
        "epochs": epochs,
    }


def sample(trial, space: tuple[plans.Dimension, ...]) -> dict:
    """One point of the space, drawn by the trial; a param whose `when` isn't met is left out."""
    point = {}
    for d in space:
        if any(point.get(k, object()) != v for k, v in d.when.items()):
            continue
        if d.kind == "categorical":
            point[d.param] = trial.suggest_categorical(d.param, list(d.args))
        elif d.kind == "int":
            point[d.param] = trial.suggest_int(d.param, *d.args)
        else:
            point[d.param] = trial.suggest_float(d.param, *d.args, log=d.kind == "log_uniform")
    return point


def retry_stale(study, storage: str) -> None:
    """Trials left running by a search that was cut short (Ctrl-C, a killed machine): failed,
    and their params queued again. On one machine (SQLite) nothing else can be running them."""
    from optuna.trial import TrialState

    if not storage.startswith("sqlite"):
        return  # many machines: another worker may be running it (heartbeats tell)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
        print(f"{TOOL}: trial {t.number} was cut short: its params are queued again", flush=True)


def ended(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_search(plan: plans.Plan, prefix: str, study, args, extra: dict, base: dict) -> None:
    """Trials in batches of --jobs until --trials have ended (complete or pruned), each a DVC
    experiment that reports its epochs to its trial; then the best recipe's rerun."""
    import optuna
    from optuna.trial import TrialState

    pruner = pruner_args(plan, extra)
    storage = storage_for(args.storage)
    retry_stale(study, args.storage)
    while (left := args.trials - ended(study)) > 0:
        optuna.storages.fail_stale_trials(study)  # another worker's, dead for GRACE_SECONDS
        batch = {}
        for _ in range(min(args.jobs, left)):
            trial = study.ask()
            name = plans.trial_name(prefix, trial.number)
            changes = {**plan.regime, **sample(trial, plan.space), "seed": plan.seeds[0], **extra}
            try:
                plans.check(base, changes, name)
            except ParamsError as exc:  # a combination the schema refuses: not a trial to run
                print(f"{TOOL}: {exc}", flush=True)
                study.tell(trial, state=TrialState.FAIL)
                continue
            handle = trials.Handle(args.storage, prefix, trial._trial_id, trial.number, pruner)
            trials.write_handle(name, handle, args.runner.trial_root(name))
            batch[name] = (trial, changes)
        if not batch:
            raise ParamsError("the schema refused every point of a batch (see above): stopping")
        print(f"{TOOL}: trials {', '.join(batch)} ({ended(study)} of {args.trials} ended)")
        with beating(storage, [t._trial_id for t, _ in batch.values()]):
            failed = args.runner.run([(n, c) for n, (_, c) in batch.items()], args.jobs, TOOL)
        by_name = finished_runs(prefix, args)
        for name, (trial, _) in batch.items():
            trials.handle_file(name, args.runner.trial_root(name)).unlink(missing_ok=True)
            run = by_name.get(name)
            if name in failed or run is None:
                study.tell(trial, state=TrialState.FAIL)
            elif run.data.metrics.get("final_pruned") == 1:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, run.data.metrics["final_val_accuracy"])
        if failed and len(failed) == len(batch):
            raise ParamsError(f"every trial of the batch failed ({', '.join(failed)}): stopping")
    rerun_best(plan, prefix, study, args, extra)


def rerun_best(plan: plans.Plan, prefix: str, study, args, extra: dict) -> None:
    """The best trial's recipe, unpruned, with each seed of search.seeds_of_the_best it has not
    run with yet (`<prefix>-t<n>-s<seed>`; the trial itself, which ended unpruned, is its seed
    plan.seeds[0]). No trial handle: the train stage runs every epoch."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print(f"{TOOL}: no trial ran to its end (all pruned or failed): no recipe to rerun")
        return
    best = study.best_trial
    done = finished_runs(prefix, args)
    todo = [
        (
            rerun_name(prefix, best.number, seed),
            {**plan.regime, **best.params, "seed": seed, **extra},
        )
        for seed in plan.search["seeds_of_the_best"]
        if seed != plan.seeds[0] and rerun_name(prefix, best.number, seed) not in done
    ]
    if todo:
        print(
            f"{TOOL}: the best trial is {plans.trial_name(prefix, best.number)}: its recipe again"
        )
        args.runner.run(todo, args.jobs, TOOL)


def rerun_name(prefix: str, number: int, seed: int) -> str:
    return plans.exp_name(prefix, f"t{number}", seed)


# --- reports ---------------------------------------------------------------------------------


def finished_runs(prefix: str, args) -> dict:
    """{experiment name: its finished run} of the names `<prefix>-…`: from MLflow, or from the
    journal of a pass without DVC."""
    from stages.experiments import reports

    client, experiment_id, _, _ = reports.open_experiment(args.tracking_uri)
    return reports.finished_runs(client, experiment_id, prefix) if experiment_id else {}


def compared_runs(plan: plans.Plan, prefix: str, args) -> list[str]:
    """The runs of a study's `<prefix>-comparison.md`, row by row: every finished run of the
    plan's rows under the prefix, of this pass and of the earlier ones, as in its table. A pass
    of some rows (`--rows`) adds its runs to the comparison instead of replacing the others'."""
    finished = finished_runs(prefix, args)
    seeds = plans.seeds_run(plan, prefix, finished, args.seeds)
    names = (plans.exp_name(prefix, row, seed) for row in plan.rows for seed in seeds)
    return [name for name in names if name in finished]


def report(plan: plans.Plan, prefix: str, args) -> bool:
    """The plan's report from what finished; False, with one line saying why, when none was
    written (nothing finished, a committed report would shrink, the server is down)."""
    from stages.experiments.reports import path, search, table

    errors: tuple[type[Exception], ...] = (ParamsError, OSError)
    if not args.without_dvc:
        from mlflow.exceptions import MlflowException  # imported here: MLflow is slow to import

        errors += (MlflowException,)
    where = {"out_dir": args.out, "tracking_uri": args.tracking_uri, "force": args.force}
    try:
        if plan.kind == "rows":
            written = table.build(plan, prefix, seeds=args.seeds, **where)
            print(written.read_text())
        elif plan.kind == "techniques":
            written = path.build(plan, prefix, seeds=args.seeds, **where)
        else:
            written = search.build(plan, prefix, args.storage, **where)
    except errors as exc:
        print(f"{TOOL}: no report: {(str(exc).splitlines() or [repr(exc)])[0]}")
        return False
    print(f"{TOOL}: report: {written}")
    return True


# --- the command -----------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    try:
        plan = plans.load(args.grid)
        prefix = args.prefix_used = args.prefix or plan.prefix
        args.shared = args.storage is not None  # a grid's points taken through the storage
        if args.shared and args.shard:
            raise ParamsError("--storage shares the points out as workers are free: no --shard")
        args.storage = args.storage or default_storage()
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        # Who runs the experiments: the dvcqueue module (DVC experiments, MLflow runs) or, without
        # DVC, a folders.Folders (folders of their own, a journal). Both have run(experiments,
        # jobs, tool) -> the names that failed, and trial_root(name): where a trial's handle goes.
        if args.without_dvc:
            if args.push:
                raise ParamsError("--without-dvc makes no DVC experiments to push: no --push")
            args.runner = folders.Folders.of(prefix, args.journal)
            args.tracking_uri = args.runner.tracking_uri
        elif args.journal:
            raise ParamsError("--journal goes with --without-dvc (DVC experiments log to MLflow)")
        else:
            args.runner, args.tracking_uri = dvcqueue, None  # params.yaml's MLflow store
        extra = plans.parse_sets(args.set)
        if args.command == "run":
            plans.check_committed_params()
            base = P.read_yaml()
            if plan.kind == "space":
                if not args.trials:
                    raise ParamsError(f"plan {plan.name!r} is a search: give --trials N")
                study = open_study(plan, prefix, args.storage, extra)
            else:
                chosen = plans.select(plan, args.only)
                seeds = args.seeds or list(plan.seeds)
                todo = shard(
                    plans.experiments(plan, chosen, seeds, prefix, extra, base), args.shard
                )
    except ParamsError as exc:
        sys.exit(f"error ({TOOL}): {exc}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    failed = []
    if args.command == "run":
        try:
            if plan.kind == "space":
                run_search(plan, prefix, study, args, extra, base)
            else:
                failed = run_grid(todo, args)
        except ParamsError as exc:
            print(f"error ({TOOL}): {exc}", file=sys.stderr)
            failed = ["search"]
    reported = report(plan, prefix, args)  # of what finished, even when some failed
    if args.command == "run" and plan.kind == "rows" and not args.without_dvc:
        # and the study's runs, one by one (from MLflow)
        compared = compared_runs(plan, prefix, args)
        if compared:
            compare = [sys.executable, "-m", "stages.experiments.compare", "--exps"]
            subprocess.run([*compare, ",".join(compared), "--prefix", prefix], check=True)
    dvcqueue.exit_if_failed(failed, TOOL)
    if args.command == "report" and not reported:
        sys.exit(1)  # asked for a report, got none (the line above says why)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--grid", required=True, help=f"a plan ({', '.join(plans.names())})")
    parser.add_argument("--prefix", help="experiment names <prefix>-… (default: the plan's)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="experiments at once (DVC queue workers; processes with --without-dvc)",
    )
    parser.add_argument("--seeds", help="comma-separated seeds (default: the plan's)")
    parser.add_argument(
        "--rows",
        "--techniques",
        dest="only",
        help="comma-separated rows or techniques (default: all)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param over every experiment (repeatable), e.g. --set train.epochs=5 for a quick "
        "pass; use it with another --prefix",
    )
    parser.add_argument("--trials", type=int, help="a search: trials in all (counted in the study)")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL: a search's study (default: optuna.db); for a study or a path, "
        "workers sharing it take the next point nobody has taken",
    )
    parser.add_argument("--shard", help="i/n: run only the i-th of n parts (one per machine)")
    parser.add_argument("--push", metavar="GIT_REMOTE", help="then dvc exp push the finished ones")
    parser.add_argument(
        "--force", action="store_true", help="replace a committed report even with less in it"
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="the report's folder")
    parser.add_argument(
        "--without-dvc",
        action="store_true",
        help="no DVC, no MLflow: each experiment in a folder of its own, its run journaled",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        help="with --without-dvc: the runs' journal (default: data/without-dvc/<prefix>/journal)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
