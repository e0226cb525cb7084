"""Run named experiments without DVC or MLflow: each in a folder of its own, through the stages'
own main(), its run written to a journal (for a machine that has neither, like the GPU machine).

The engine (engine.py, `--without-dvc`) hands `Folders.run` the same list of (name, params
changes) that dvcqueue.run queues as DVC experiments. Each experiment runs in
data/without-dvc/<prefix>/<name>/ as `dvc repro` would run it there: params.yaml written (the
repository's params.yaml with the changes on top), then augment.main(), train.main() and
evaluate.main() — the stages' code, unchanged — their output in log.txt beside them. What DVC
would set, this sets in the experiment's own process: `DVC_EXP_NAME` (which names the run and
its dvc.exp_name tag, so the runs are found by name as DVC experiments' runs are) and the
tracking URI `journal:<folder>` (stages/tracking/journal.py: nothing imports mlflow). `jobs`
experiments run at once, each its own spawned process (on one GPU, a small network leaves most
of it idle; several processes fill it). `python -m stages.tracking.replay <journal folder>`
makes the runs MLflow runs later, on a machine with MLflow.

The download stage runs once, in the repository; every folder links its data/raw.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages import io as sio, params as P
from stages.runtime import repo_root

WORK = Path("data/without-dvc")  # under the repository root: <prefix>/<name>/, <prefix>/journal/
STAGES = ("augment", "train", "evaluate")


def run_stages(
    folder: Path,
    params: dict,
    journal: Path,
    name: str | None = None,
    stages: tuple[str, ...] = STAGES,
    linked: tuple[str, ...] = ("raw",),
    log: Path | None = None,
) -> dict[str, float]:
    """The stages' main(), in order, in `folder` (made now: params.yaml, and data/<linked>
    linked to the repository's), as `dvc repro` would run them there, their run journaled in
    `journal` and named `name`, their output appended to `log` (None: this process's own);
    each stage's seconds. Changes this process's working folder and environment: call it in a
    process of its own, or last."""
    root = repo_root()
    P.parse(params)  # the schema's one line, before anything is made
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for data in linked:
        if not (folder / "data" / data).exists():
            (folder / "data" / data).symlink_to(root / "data" / data)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"journal:{journal}"
    if name:
        os.environ["DVC_EXP_NAME"] = name
    seconds = {}
    with contextlib.ExitStack() as output:
        if log is not None:
            to = output.enter_context(open(log, "a"))
            output.enter_context(contextlib.redirect_stdout(to))
            output.enter_context(contextlib.redirect_stderr(to))
        for stage in stages:
            start = time.perf_counter()
            importlib.import_module(f"stages.{stage}").main()
            seconds[stage] = time.perf_counter() - start
    return seconds


def run_experiment(job: tuple[str, dict, Path, Path, Path]) -> tuple[str, str | None]:
    """One experiment in a spawned process: (its name, the error that stopped it or None)."""
    name, changes, root, folder, journal = job
    try:
        os.chdir(root)
        params = P.with_changes(P.read_yaml(root / P.PARAMS_FILE), changes)
        run_stages(folder, params, journal, name, log=folder / "log.txt")
        return name, None
    except BaseException as exc:  # a stage's SystemExit too: the other experiments go on
        if isinstance(exc, SystemExit) and isinstance(exc.code, str):
            return name, exc.code.strip()[:300]  # a stage's own line: error (<stage>): ...
        return name, f"{type(exc).__name__}: {str(exc).strip()[:300]}"


@dataclass(frozen=True)
class Folders:
    """Where a pass without DVC runs its experiments (one folder each) and journals their runs."""

    work: Path  # data/without-dvc/<prefix>, absolute
    journal: Path  # the runs' journal (tracking URI journal:<this>)

    @classmethod
    def of(cls, prefix: str, journal: Path | None = None) -> Folders:
        work = repo_root() / WORK / prefix
        return cls(work, (journal or work / "journal").resolve())

    @property
    def tracking_uri(self) -> str:
        return f"journal:{self.journal}"

    def trial_root(self, name: str) -> Path:
        """Where the experiment's train stage looks for its search trial (data/trials/)."""
        return self.work / name

    def run(self, experiments: list[tuple[str, dict]], jobs: int, tool: str) -> list[str]:
        """Run `experiments`, `jobs` at a time, a line each as it ends; the names that failed."""
        if experiments and not (repo_root() / "data/raw/meta.json").exists():
            from stages import download

            download.main()
        root, failed = repo_root(), []
        todo = [(n, c, root, self.work / n, self.journal) for n, c in experiments]
        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")  # no state of this process in theirs
        with context.Pool(max(1, jobs), maxtasksperchild=1) as pool:
            for name, error in pool.imap_unordered(run_experiment, todo):
                minutes = (time.perf_counter() - start) / 60
                if error:
                    failed.append(name)
                    log = self.work / name / "log.txt"
                    print(f"{tool}: {name} FAILED: {error} (log: {log})", flush=True)
                    continue
                test = sio.read_json(self.work / name / "metrics" / "eval.json")["test_accuracy"]
                print(f"{tool}: {name}: test {100 * test:.1f}% ({minutes:.1f} min in)", flush=True)
        return failed
