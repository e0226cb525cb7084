"""Parallel trainings on one machine: how many threads should each use?

    python benchmarks/threads.py [--images 10000] [--epochs 3]   (part of make bench)

Times the pipeline's training epoch (`net`, batch 100, synthetic 32×32 images) in separate
processes started together, as `dvc queue start -j N` would, and reports the combined images per
second for: one process with every core; N = cores processes with every core each (PyTorch's
default); N processes with cores / N threads each (the pipeline's choice under a queue).
Writes reports/threads.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from stages import params as P, train
from stages.data import Policy, epoch_generator
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
    train.train_one_epoch(model, images, labels, opt, sched, loss_fn, 100, Policy(), None, epoch_generator(0, epoch))
print(time.perf_counter() - start)
"""


def run(processes: int, threads: int, images: int, epochs: int) -> float:
    """Combined images per second of `processes` trainings started together."""
    code = WORKER.format(repo=str(REPO), threads=threads, images=images, epochs=epochs)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    seconds = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return processes * images * epochs / max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "threads.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    n = max(2, cores)
    cases = [
        ("1 process, all cores", 1, cores),
        (f"{n} processes, all cores each (oversubscribed)", n, cores),
        (
            f"{n} processes, {max(1, cores // n)} thread(s) each (the pipeline's choice)",
            n,
            max(1, cores // n),
        ),
    ]
    result = {}
    for name, processes, threads in cases:
        time.sleep(1)
        result[name] = run(processes, threads, args.images, args.epochs)
        print(f"{name}: {result[name]:,.0f} images/s combined", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": cores, "images_per_second": result}, indent=2) + "\n")
    print("\n| case | combined images/s |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:,.0f} |")


if __name__ == "__main__":
    main()
