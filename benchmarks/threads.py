"""A shared machine: one training alone, and each of two trainings at once.

    python benchmarks/threads.py [--images 10000] [--epochs 3] [--repeats 3]   (part of make bench)

Times the pipeline's training epoch (`net`, batch 100, synthetic 32×32 images) in separate
processes started together, and reports each process's own images per second:
- one training alone, as the pipeline runs it (stages/__init__.py shortens OpenMP's spin-wait,
  GOMP_SPINCOUNT, before torch loads);
- one training alone with PyTorch's default (long) spin-wait: what a solo run costs or gains from
  the short one;
- two trainings at once, every core each: two `dvc exp run`s, or one beside `make test`;
- the same with PyTorch's default spin-wait: the collapse the pipeline avoids;
- two DVC queue workers (`dvc queue start -j 2`): cores / 2 threads each (stages/runtime.py).
Cases are interleaved, `--repeats` rounds; the median over rounds (and processes) is reported.
Writes reports/threads.json and prints a Markdown table with each figure as a fraction of the
pipeline's training alone.
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

# `{first}` is imported first: `stages` (its __init__ sets the spin-wait, as for every stage) or
# `torch` (loaded before stages can set it: PyTorch's default).
WORKER = """
import {first}
import sys, time, torch
sys.path.insert(0, {repo!r})
from stages import params as P, train
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
start = time.perf_counter()
for epoch in range({epochs}):
    train.train_one_epoch(model, images, labels, train.Recipe(opt, sched, loss_fn, 100), epoch_generator(0, epoch))
print(time.perf_counter() - start)
"""


def run(processes: int, threads: int, first: str, images: int, epochs: int) -> list[float]:
    """Each process's images per second, `processes` trainings started together."""
    code = WORKER.format(first=first, repo=str(REPO), threads=threads, images=images, epochs=epochs)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(processes)
    ]
    seconds = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return [images * epochs / s for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "threads.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cases = {  # name: (processes, threads each, imported first)
        "one training alone (the pipeline)": (1, cores, "stages"),
        "one training alone, PyTorch's default spin": (1, cores, "torch"),
        "each of two at once (the pipeline)": (2, cores, "stages"),
        "each of two at once, PyTorch's default spin": (2, cores, "torch"),
        "each of two queue workers (dvc queue start -j 2)": (2, max(1, cores // 2), "stages"),
    }
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (processes, threads, first) in cases.items():
            time.sleep(1)
            rounds[name] += run(processes, threads, first, args.images, args.epochs)
            print(f"{name}: {[round(x) for x in rounds[name]]} images/s", flush=True)
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
