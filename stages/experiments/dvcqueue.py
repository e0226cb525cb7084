"""Run named experiments through DVC's queue, and say how each one ended as it ends.

The engine (engine.py) hands `run` a list of (name, params changes):
each becomes `dvc exp run --queue -n <name> -S key=value ...`, the queue runs with
`dvc queue start -j N`, and while it runs every experiment that ends prints one line — its name,
test accuracy and minutes, or, when it failed, the first error line of its log. `run` returns the
names that failed, so the caller can still write the table of what finished before exiting
non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages import params as P
from stages.runtime import repo_root

WORKERS = Path(".dvc/tmp/exps/celery")  # where DVC's queue workers write their logs
RESULTS = WORKERS / "result"  # a file per task that has ended (celery's result backend)
ENDED = ("Success", "Failed")  # the `dvc queue status` states a task doesn't leave
# Listings in a row that show one of ours Running with no worker left before it counts as lost
# (a worker still starting is not listed yet; one listing can be taken mid-change).
ORPHAN_LISTINGS = 3
LOST = (
    "DVC lists it Running but no queue worker is left to end it; "
    "run the command again (DVC restores what finished)"
)


def run(experiments: list[tuple[str, dict]], jobs: int, tool: str) -> list[str]:
    """Queue `experiments` in order, run them with `jobs` workers, wait for all of them; the
    names of those that failed. `tool` ("study", "sweep") starts the progress lines."""
    before = set(tasks(queue_status()))  # tasks of earlier passes, still listed by DVC
    for name, changes in experiments:
        cmd = ["dvc", "exp", "run", "--queue", "-n", name, *P.set_options(changes)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ours = {task: name for task, (name, _) in tasks(queue_status()).items() if task not in before}
    start_workers(jobs)
    failed = wait(ours, tool, jobs=jobs)
    report_dead_workers(tool)
    return failed


def trial_root(name: str) -> Path:
    """Where a queued experiment's train stage finds its search trial (data/trials/): the
    repository, which DVC names in $DVC_ROOT inside the experiment's temporary workspace."""
    return repo_root()


def start_workers(jobs: int) -> None:
    """`dvc queue start -j jobs`, its output printed once it returns. Not handed our stdout: DVC
    forks a keeper process per worker that inherits it and lives as long as the worker, so a
    caller reading our output through a pipe (`make study | tee log`, a CI job, a test) would
    wait for the workers to go, not for us."""
    with tempfile.TemporaryFile("w+") as log:
        result = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], stdout=log, stderr=log)
        log.seek(0)
        print(log.read(), end="", flush=True)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, result.args)


def exit_if_failed(failed: list[str], tool: str) -> None:
    """One line naming the experiments that failed (their errors were printed as they ended)."""
    if failed:
        sys.exit(f"error ({tool}): {len(failed)} experiment(s) failed: {', '.join(failed)}")


def queue_status(max_failures: int = 5, retry_seconds: float = 2) -> str:
    """`dvc queue status`'s output. It fails now and then while workers start (the broker race
    below); a few failures in a row are retried, more are an error."""
    for _ in range(max_failures):
        status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True)
        if status.returncode == 0:
            return status.stdout
        time.sleep(retry_seconds)
    raise RuntimeError(
        f"`dvc queue status` failed {max_failures} times in a row: {status.stderr.strip()[-300:]}"
    )


def tasks(status: str) -> dict[str, tuple[str, str]]:
    """{task id: (experiment name, state)} from `dvc queue status`'s table (Task, Name, Created,
    Status: the name is the second column, the state the last)."""
    found = {}
    for line in status.splitlines()[1:]:
        cells = line.split()
        if len(cells) >= 4 and cells[-1] in ("Queued", "Running", *ENDED):
            found[cells[0]] = (cells[1], cells[-1])
    return found


def pending(status: str) -> int:
    """How many tasks `dvc queue status` lists as Queued or Running."""
    return sum(1 for _, state in tasks(status).values() if state not in ENDED)


def wait(ours: dict[str, str], tool: str, poll_seconds: float = 10, jobs: int = 0) -> list[str]:
    """Until every task in `ours` ({task id: name}) has ended, printing a line for each as it
    ends; the names of those that failed. `dvc queue status` every `poll_seconds`, or sooner
    when a task ends. With `jobs`, workers are started again while some of ours are queued, fewer
    than `jobs` workers are left and one of them has died (keep_workers). A task still listed
    Running after its worker has gone (ORPHAN_LISTINGS listings without a worker, listed or
    alive; seen here: a worker stopped "due to empty queue" while running a restored
    experiment) counts as failed, instead of being waited for for ever."""
    left, failed, missing = dict(ours), [], {}
    seen, workerless = ended_tasks(), 0
    while left:
        sleep_until_a_task_ends(poll_seconds, seen)
        seen = ended_tasks()  # before the listing: a task ending during it wakes the next sleep
        status = queue_status()
        now, listed_at = tasks(status), time.monotonic()
        workerless = workerless + 1 if workers(status) == 0 and not live_workers() else 0
        if jobs:
            keep_workers(
                status,
                [task for task in left if now.get(task, ("", ""))[1] == "Queued"],
                jobs,
                tool,
            )
        for task, name in list(left.items()):
            if task in now:
                missing.pop(task, None)
                state = now[task][1]
            elif task not in missing:  # a listing taken while DVC rewrites its queue can lack
                missing[task] = listed_at  # a running task
                continue
            elif listed_at - missing[task] >= poll_seconds:
                state = "Success"  # gone from the listings for a whole poll: DVC collected it
            else:
                continue
            if state == "Running" and workerless >= ORPHAN_LISTINGS:
                state = "Lost"  # its worker stopped under it: nothing will end it (orphaned)
            if state not in (*ENDED, "Lost"):
                continue
            del left[task]
            done = len(ours) - len(left)
            if state in ("Failed", "Lost"):
                failed.append(name)
                why = LOST if state == "Lost" else first_error(name)
                print(f"{tool}: [{done}/{len(ours)}] {name} {state.upper()}: {why}", flush=True)
            else:
                print(f"{tool}: [{done}/{len(ours)}] {name}: {result_line(name)}", flush=True)
    return failed


WORKER_STATUS = re.compile(r"Worker status: (\d+) active, (\d+) idle")


def workers(status: str) -> int:
    """The queue's workers, active and idle, as `dvc queue status` counts them."""
    found = WORKER_STATUS.search(status)
    return int(found.group(1)) + int(found.group(2)) if found else 0


def keep_workers(status: str, queued: list[str], jobs: int, tool: str) -> None:
    """Start workers again when some of our tasks wait, fewer than `jobs` workers are left and a
    worker's log says it died: a worker can die between two tasks on the same broker race as at
    its start (report_dead_workers; seen after an experiment ended), and the rest of the pass
    then ran on one worker of two. Only then: a worker still starting is not listed yet, and a
    second `dvc queue start` beside it would start a second worker of the same number."""
    have, died = workers(status), workers_that_died_starting()
    if queued and have < jobs and died:
        print(
            f"{tool}: DVC queue worker {', '.join(map(str, died))} died (treeverse/dvc-task#73) "
            f"with {len(queued)} experiments queued: starting workers again",
            flush=True,
        )
        start_workers(jobs)


def sleep_until_a_task_ends(seconds: float, seen: set[str], glance_seconds: float = 0.5) -> None:
    """Sleep `seconds`, or less when the queue's results are no longer those `seen` (a task has
    ended). Each `dvc queue status` is a DVC start-up, too dear to run every moment; a glance at
    the result folder, where a file appears for each task that ends, costs next to nothing."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and ended_tasks() == seen:
        time.sleep(min(glance_seconds, left))


def ended_tasks() -> set[str]:
    """The names of the queue's result files (none before the queue has run)."""
    return {path.name for path in RESULTS.glob("*")}


def finished_run(name: str):
    """The experiment's finished MLflow run; for one that DVC's run cache restored (nothing ran,
    nothing was logged), the run recorded for it now (restored.py); None when there is neither."""
    from stages.experiments import reports, restored

    client, experiment_id, _, _ = reports.open_experiment()
    if experiment_id is None:
        return None
    run = reports.finished_runs(client, experiment_id, name=name).get(name)
    return run or restored.record(client, experiment_id, name)


def result_line(name: str) -> str:
    """Test accuracy and minutes (train + evaluate) of the experiment's MLflow run."""
    run = finished_run(name)
    if run is None or "test_accuracy" not in run.data.metrics:
        return "finished, but no evaluated MLflow run of that name"
    accuracy = f"test accuracy {100 * run.data.metrics['test_accuracy']:.1f}%"
    if "restored_from" in run.data.tags:
        return (
            f"{accuracy}, restored by DVC from run {run.data.tags['restored_from']} (same params)"
        )
    minutes = (run.info.end_time - run.info.start_time) / 60000
    return f"{accuracy}, {minutes:.1f} min"


def first_error(name: str) -> str:
    """The first error line of a failed experiment's log (`dvc queue logs <name>`): the stage's
    own one-line `error (<stage>): ...` when there is one, else DVC's `ERROR: ...`."""
    logs = subprocess.run(["dvc", "queue", "logs", name], capture_output=True, text=True)
    lines = [line.strip() for line in (logs.stdout + logs.stderr).splitlines()]
    for marker in ("error (", "ERROR", "Error"):
        for line in lines:
            if line.startswith(marker) or (marker != "error (" and marker in line):
                return line
    return f"no error line in its log (see `dvc queue logs {name}`)"


def report_dead_workers(tool: str) -> None:
    """Workers that start together can race on the file-based message broker of DVC's queue
    (kombu's filesystem transport): one reads an exchange file while the other writes it, and
    dies with JSONDecodeError (treeverse/dvc-task#73), at its start or between two tasks. The
    queue still completes on the other workers, and the wait starts workers again while tasks of
    the pass are queued (keep_workers). (Starting them one by one doesn't help: a second
    `dvc queue start` doesn't see a busy worker, and starts another worker 1 or waits for it.)"""
    for n in workers_that_died_starting():
        print(
            f"{tool}: DVC queue worker {n} died at start (a known DVC race, treeverse/dvc-task#73); "
            "the other workers ran its share",
            flush=True,
        )


def live_workers(repo: Path = Path(".")) -> list[int]:
    """The pids of queue workers still alive, from their pid files (a worker that stopped leaves
    its file): a second witness beside the listing, whose count a slow ping can miss."""
    alive = []
    for pid_file in (repo / WORKERS).glob("dvc-exp-worker-*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except (ValueError, ProcessLookupError, FileNotFoundError):
            continue
        except PermissionError:
            pass  # it exists, under another user
        alive.append(pid)
    return alive


def workers_that_died_starting(repo: Path = Path(".")) -> list[int]:
    """Queue workers whose log (of the latest start) ends in celery's 'Unrecoverable error'."""
    died = []
    for log in sorted((repo / WORKERS).glob("dvc-exp-worker-*.out")):
        since_last_banner = log.read_text(errors="replace").rsplit("@localhost v", 1)[-1]
        if "Unrecoverable error" in since_last_banner:
            died.append(int(log.stem.rsplit("-", 1)[1]))
    return died
