"""Where the wall time of a `dvc exp run` goes, and what parallel queue workers give.

    python benchmarks/overhead.py breakdown [--source ARCHIVE --sha256 HASH] [--repeats 3]
    python benchmarks/overhead.py queue     [--source ARCHIVE --sha256 HASH] [--experiments 6]
    (make bench runs both, on the bundled datasets/cifar10-jpg.tar.gz)

Both work in a scratch clone of this repository (the files git tracks, a fresh git repository,
its own mlflow.db) in the 5,000-image regime (data.train_size 5000, lr 0.01), after one
`dvc repro` that downloads the data and is committed as the baseline.

breakdown: repeats of one experiment that changes a train param (so check, train and evaluate
rerun; --epochs 3), run plain (`dvc exp run -S ...`) and queued (`dvc exp run --queue -S ...`,
then `dvc queue start -j 1` until the queue is empty), interleaved. Every stage process is
started through a `python` shim first on PATH, which notes when it starts and ends and when each
line of its output arrives, so the wall time splits into
  dvc         DVC's own work: everything outside the stage processes (git status, hashing,
              dvc.lock, the exp ref; for a queued run also the worker's start, the temporary
              workspace with its checkout of the data, and collecting the result)
  startup     each stage's import, measured apart (`python -c "import stages.<name>"`)
  epochs      the train stage's epochs: the time between its epoch lines, times the epochs
              (each epoch = training pass + measuring the clean train and val sets + logging)
  train_tail  after the last epoch: outputs, curves, MLflow artifacts and the logged model
  rest        the stages' other work: params, data, model, MLflow run set-up, evaluate's test
and overhead = wall - epochs (the goal: <= 15 s).

A queued run ends when DVC has collected it (its ref under refs/exps); `dvc queue start` returns
at once, and the idle worker's shutdown afterwards is not counted.

queue: the same number of experiments (--queue-epochs each, a different lr each) through
`dvc queue start -j 1` and `-j 2`; experiments per hour each, and the ratio (the goal: >= 1.7).

Figures are medians; the machine may be shared, so compare only figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench import time_startups  # noqa: E402
from conftest import copy_repo, write_params  # noqa: E402

from stages import params as P  # noqa: E402

STAGES = ("check", "download", "augment", "train", "evaluate")
REGIME = {"data.train_size": 5000, "train.lr": 0.01}

SHIM = """#!{python}
# Runs the real python and notes, for benchmarks/overhead.py, when it started and ended and when
# each line of its output came.
import json, os, subprocess, sys, time
start = time.time()
proc = subprocess.Popen([{python!r}, *sys.argv[1:]], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, bufsize=1)
lines = []
for line in proc.stdout:
    lines.append((time.time(), line.rstrip()))
    sys.stdout.write(line)
    sys.stdout.flush()
code = proc.wait()
with open(os.environ["OVERHEAD_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "start": start, "end": time.time(),
                        "lines": lines, "code": code}}) + "\\n")
sys.exit(code)
"""


class Scratch:
    """A scratch clone with the baseline pipeline run and committed."""

    def __init__(self, folder: Path, source: str, sha256: str, epochs: int):
        self.repo = copy_repo(folder / "repo")
        self.log = folder / "processes.jsonl"
        shim_dir = folder / "shim"
        shim_dir.mkdir()
        shim = shim_dir / "python"
        shim.write_text(SHIM.format(python=sys.executable))
        shim.chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{shim_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
            f"{os.environ['PATH']}",
            "OVERHEAD_LOG": str(self.log),
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
            self.env.pop(var, None)
        write_params(
            self.repo,
            **{**REGIME, "data.source": source, "data.sha256": sha256, "train.epochs": epochs},
        )
        self.run("git", "init", "-q")
        self.run("git", "add", "-A")
        self.run("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "base")
        print("scratch: dvc repro of the baseline (downloads the data) ...", flush=True)
        self.run("dvc", "repro", "-q")
        self.run("git", "add", "-A")
        self.run("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "lock")

    def run(self, *cmd: str) -> str:
        # Output through files, not pipes: `dvc queue start` leaves a process per worker
        # holding what it was given, and reading a pipe would wait for the workers to go.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            done = subprocess.run(cmd, cwd=self.repo, env=self.env, stdout=out, stderr=err)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}{stderr[-3000:]}")
        return stdout

    def processes(self) -> list[dict]:
        """The stage processes noted since the last call."""
        if not self.log.exists():
            return []
        noted = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return [p for p in noted if p["argv"][:1] == ["-m"] and p["argv"][1].startswith("stages.")]

    def experiments(self) -> int:
        """How many experiments DVC has collected (refs/exps/...): cheap to ask, unlike
        `dvc queue status`, which costs a second of CPU."""
        refs = self.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
        # refs/exps/<baseline sha[:2]>/<sha[2:]>/<name>; not the queue's stash (refs/exps/celery)
        # nor the running executor's refs (refs/exps/exec), which exist while it runs
        return sum(len(r.split("/")) == 5 and len(r.split("/")[2]) == 2 for r in refs)

    def queue_busy(self) -> bool:
        status = self.run("dvc", "queue", "status")
        return any(
            line.split()[-1] in ("Queued", "Running")
            for line in status.splitlines()[1:]
            if line.split()
        )

    def wait_for_queue(self, before: int, experiments: int) -> None:
        """Until DVC has collected `experiments` more experiments than `before` (the end of the
        last one's work; the idle worker's shutdown later is not counted). Whether the queue
        is still busy, in case one failed, is asked only every 20 s."""
        asked = time.perf_counter()
        while self.experiments() < before + experiments:
            time.sleep(0.2)
            if time.perf_counter() - asked > 20:
                if not self.queue_busy():
                    raise SystemExit(f"the queue stopped: {self.run('dvc', 'queue', 'status')}")
                asked = time.perf_counter()


def stage_of(process: dict) -> str:
    return process["argv"][1].removeprefix("stages.")


def split(wall: float, processes: list[dict], startup: dict[str, float]) -> dict[str, float]:
    """One experiment's wall time, by what it was spent on (see the module's docstring)."""
    out = {"wall": wall, "dvc": wall - sum(p["end"] - p["start"] for p in processes)}
    out["startup"] = sum(startup[stage_of(p)] for p in processes)
    out["epochs"] = out["train_tail"] = 0.0
    for p in processes:
        out[f"stage_{stage_of(p)}"] = p["end"] - p["start"]
        if stage_of(p) != "train":
            continue
        epoch_times = [t for t, line in p["lines"] if line.startswith("epoch ")]
        if len(epoch_times) >= 2:
            each = (epoch_times[-1] - epoch_times[0]) / (len(epoch_times) - 1)
            out["epochs"] = each * len(epoch_times)
            out["train_tail"] = p["end"] - epoch_times[-1]
    out["rest"] = wall - out["dvc"] - out["startup"] - out["epochs"] - out["train_tail"]
    out["overhead"] = wall - out["epochs"]
    return out


def breakdown(scratch: Scratch, repeats: int, startup: dict[str, float]) -> dict:
    runs: dict[str, list[dict]] = {"plain": [], "queued": []}
    lr = iter(f"0.0{n:03d}1" for n in range(100, 999))  # a new train param every time
    scratch.processes()
    for rep in range(repeats):
        for kind in ("plain", "queued"):
            start = time.perf_counter()
            if kind == "plain":
                scratch.run("dvc", "exp", "run", "-S", f"train.lr={next(lr)}")
            else:
                scratch.run("dvc", "exp", "run", "--queue", "-S", f"train.lr={next(lr)}")
                before = scratch.experiments()
                start = time.perf_counter()  # queueing is done before the run, apart
                scratch.run("dvc", "queue", "start", "-j", "1")
                scratch.wait_for_queue(before, 1)
            wall = time.perf_counter() - start
            runs[kind].append(split(wall, scratch.processes(), startup))
            row = runs[kind][-1]
            print(
                f"repeat {rep + 1}/{repeats} {kind}: wall {row['wall']:.1f} s, epochs "
                f"{row['epochs']:.1f} s, overhead {row['overhead']:.1f} s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k not in ("wall", "epochs")),
                flush=True,
            )
    return {
        kind: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for kind, rows in runs.items()
    }


def queue_throughput(scratch: Scratch, experiments: int, rounds: int) -> dict:
    lr = iter(f"0.0{n:03d}3" for n in range(100, 999))
    hours: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for jobs in (1, 2):
            for _ in range(experiments):
                scratch.run("dvc", "exp", "run", "--queue", "-S", f"train.lr={next(lr)}")
            before = scratch.experiments()
            start = time.perf_counter()
            scratch.run("dvc", "queue", "start", "-j", str(jobs))
            scratch.wait_for_queue(before, experiments)
            elapsed = time.perf_counter() - start
            failed = [p for p in scratch.processes() if p["code"]]
            if failed:
                raise SystemExit(f"{len(failed)} stage processes failed with -j {jobs}")
            hours[jobs].append(experiments * 3600 / elapsed)
            print(f"-j {jobs}: {experiments} experiments in {elapsed:.1f} s", flush=True)
    per_hour = {j: statistics.median(v) for j, v in hours.items()}
    return {
        "experiments": experiments,
        "rounds": rounds,
        "per_hour_j1": per_hour[1],
        "per_hour_j2": per_hour[2],
        "speedup": per_hour[2] / per_hour[1],
    }


def markdown(result: dict) -> str:
    lines = []
    if "breakdown" in result:
        b = result["breakdown"]
        keys = ["wall", "dvc", "startup", "epochs", "train_tail", "rest", "overhead"]
        lines += [
            f"One `dvc exp run` changing a train param, 5,000 images, {result['epochs']} epochs "
            f"(median of {result['repeats']}, seconds):",
            "",
            "| run | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for kind, row in b.items():
            lines.append(f"| {kind} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
        stages = ", ".join(f"{s} {v:.2f} s" for s, v in result["startup"].items())
        lines += ["", f"Stage start-up (import, median of 5): {stages} (goal: <= 2.5 s each)."]
    if "queue" in result:
        q = result["queue"]
        lines += [
            "",
            f"Queue throughput, {q['experiments']} experiments of {result['queue_epochs']} "
            f"epochs: -j 1 {q['per_hour_j1']:.0f}/h, -j 2 {q['per_hour_j2']:.0f}/h, "
            f"{q['speedup']:.2f}× (goal: >= 1.7×).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["breakdown", "queue", "all"])
    parser.add_argument(
        "--source", default=P.BUNDLED, help="data.source (default: the bundled one)"
    )
    parser.add_argument("--sha256", default=P.BUNDLED_SHA256, help="data.sha256 of that source")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per experiment, breakdown")
    parser.add_argument("--experiments", type=int, default=6, help="queue")
    parser.add_argument("--queue-epochs", type=int, default=5, help="per experiment, queue")
    parser.add_argument("--rounds", type=int, default=1, help="queue: -j 1 then -j 2, this often")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "overhead.json")
    args = parser.parse_args()
    source = str(Path(args.source).resolve())
    result: dict = {"epochs": args.epochs, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        if args.what in ("breakdown", "all"):
            result["startup"] = time_startups()
            scratch = Scratch(Path(tmp) / "b", source, args.sha256, args.epochs)
            result["breakdown"] = breakdown(scratch, args.repeats, result["startup"])
            shutil.rmtree(scratch.repo, ignore_errors=True)
        if args.what in ("queue", "all"):
            scratch = Scratch(Path(tmp) / "q", source, args.sha256, args.queue_epochs)
            result["queue"] = queue_throughput(scratch, args.experiments, args.rounds)
            result["queue_epochs"] = args.queue_epochs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    result = {**previous, **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
