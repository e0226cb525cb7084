"""A shared machine: one training alone, and each of two trainings at once.

    python benchmarks/threads.py [--images 10000] [--epochs 2] [--repeats 4] [--tests FILE ...]
    (part of make bench)

Times the pipeline's training epoch (`net`, batch 100, synthetic 32×32 images) in separate
processes started together, and reports each process's own images per second:
- one training alone, as the pipeline runs it: every core, PyTorch's own OpenMP settings;
- one training alone with a short OpenMP spin-wait (GOMP_SPINCOUNT=1000, the former default);
- two trainings at once as the pipeline runs them: each counts the other (runtime.CoreShare) and
  takes cores / 2 threads (two `dvc exp run`s, two queue workers, one beside `make test`);
- two at once, every core each, PyTorch's default spin-wait: the collapse the pipeline avoids;
- two at once, every core each, the short spin-wait: the former pipeline;
- a pipeline training beside a PyTorch program that is not the pipeline's (every core, default
  spin-wait), each reported on its own;
- a pipeline training beside the test suite (`--tests`, default tests/test_train_evaluate.py):
  its epochs that ended while the tests ran.
Every process registers (when it shares) and builds its data before a common start. Cases are
interleaved, `--repeats` rounds; the median over rounds (and like processes) is reported. Writes
reports/threads.json and prints a Markdown table, each figure a fraction of the pipeline alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import contextlib, sys, time, torch
sys.path.insert(0, {repo!r})
from stages import params as P, runtime, train
from stages.data import epoch_generator
from stages.networks import small
torch.set_num_threads({threads})
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, ({images}, 3, 32, 32), dtype=torch.uint8, generator=g)
labels = torch.randint(0, 10, ({images},), generator=g)
model = small.Net(10)
p = P.Train(lr=0.001, momentum=0.9)
opt = train.make_optimizer(p, model)
sched = train.make_scheduler(p, opt, {images} // 100)
loss_fn = train.make_loss(p, model, None)
with runtime.CoreShare() if {share} else contextlib.nullcontext():
    print("ready", flush=True)
    sys.stdin.readline()  # every process is ready: go
    start = time.perf_counter()
    print("started", time.monotonic(), flush=True)
    for epoch in range({epochs}):
        train.train_one_epoch(model, images, labels, train.Recipe(opt, sched, loss_fn, 100), epoch_generator(0, epoch))
        print("epoch", time.monotonic(), flush=True)  # the clock every process shares
print(time.perf_counter() - start)
"""

# A process: (shares the cores as the pipeline does, OpenMP spin-wait count or None for libgomp's)
PIPELINE, SHORT_SPIN = (True, None), (True, "1000")
EVERY_CORE, EVERY_CORE_SHORT_SPIN = (False, None), (False, "1000")


def start(share: bool, spin: str | None, images: int, epochs: int) -> subprocess.Popen:
    """A training process, ready (its data built, registered when it shares), waiting for go."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO)
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    cores = len(os.sched_getaffinity(0))
    code = WORKER.format(repo=str(REPO), threads=cores, share=share, images=images, epochs=epochs)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def run(processes: list[tuple[bool, str | None]], images: int, epochs: int) -> list[float]:
    """Each process's images per second, the processes started together."""
    procs = [start(share, spin, images, epochs) for share, spin in processes]
    for proc in procs:
        go(proc)
    seconds = [float(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    return [images * epochs / s for s in seconds]


def beside_tests(images: int, tests: list[str]) -> float:
    """Images per second of a pipeline training while `pytest <tests>` runs beside it: the
    epochs that ended before the tests did, from the training's start."""
    proc = start(True, None, images, epochs=100_000)
    go(proc)
    began = float(proc.stdout.readline().split()[1])
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    ended = time.monotonic()
    proc.kill()
    stamps = [
        float(line.split()[1])
        for line in proc.communicate()[0].splitlines()
        if line.startswith("epoch")
    ]
    inside = [t for t in stamps if t <= ended]
    return images * len(inside) / (inside[-1] - began)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--tests",
        nargs="*",
        default=["tests/test_train_evaluate.py"],
        help="a training beside these tests too, each round (none: skip it)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "threads.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cases = {  # name: the processes started together; each one's figure goes to its row
        "one training alone (the pipeline)": [PIPELINE],
        "one training alone, short spin-wait (GOMP_SPINCOUNT=1000)": [SHORT_SPIN],
        "each of two at once (the pipeline: cores / 2 threads each)": [PIPELINE, PIPELINE],
        "each of two at once, every core each (PyTorch's default)": [EVERY_CORE, EVERY_CORE],
        "each of two at once, every core each, short spin-wait": [
            EVERY_CORE_SHORT_SPIN,
            EVERY_CORE_SHORT_SPIN,
        ],
        "a pipeline training beside a PyTorch program outside it": [PIPELINE, EVERY_CORE],
    }
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    rounds["... and the program outside it"] = []
    beside = f"a pipeline training beside `pytest {' '.join(args.tests)}`"
    if args.tests:
        rounds[beside] = []
    for _ in range(args.repeats):
        for name, processes in cases.items():
            time.sleep(1)
            speeds = run(processes, args.images, args.epochs)
            if processes == [PIPELINE, EVERY_CORE]:
                rounds[name].append(speeds[0])
                rounds["... and the program outside it"].append(speeds[1])
            else:
                rounds[name] += speeds
            print(f"{name}: {[round(x) for x in speeds]} images/s", flush=True)
        if args.tests:
            time.sleep(1)
            rounds[beside].append(beside_tests(args.images, args.tests))
            print(f"{beside}: {round(rounds[beside][-1])} images/s", flush=True)
    median = {name: statistics.median(values) for name, values in rounds.items()}
    alone = median["one training alone (the pipeline)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"cores": cores, "images_per_second": rounds, "median": median}, indent=2) + "\n"
    )
    print("\n| case | images/s per training (median) | × the pipeline alone |\n|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:,.0f} | {value / alone:.2f} |")


if __name__ == "__main__":
    main()
