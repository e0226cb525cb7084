"""Does torch.compile (train.compile) speed up the pipeline's epoch for `net` on this machine?

    python benchmarks/compile.py [--repeats 3]

The train stage's own `train_one_epoch` on the same data as bench.py, eager and compiled,
interleaved; the compiled model is warmed up by one untimed epoch (compilation happens there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BATCH, REPO, load_data

from stages import params as P, train
from stages.data import epoch_generator
from stages.networks import small


def epoch_seconds(model, forward, images, labels, epoch: int) -> float:
    params = P.Train(lr=0.001, momentum=0.9, batch_size=BATCH)
    optimizer = train.make_optimizer(params, model)
    scheduler = train.make_scheduler(params, optimizer, len(images) // BATCH)
    loss_fn = train.make_loss(params, model, None)
    start = time.perf_counter()
    recipe = train.Recipe(optimizer, scheduler, loss_fn, BATCH)
    train.train_one_epoch(forward, images, labels, recipe, epoch_generator(0, epoch))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "compile.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    images, labels, source = load_data()
    torch.manual_seed(0)
    eager, compiled_model = small.Net(10), small.Net(10)
    compiled = torch.compile(compiled_model)
    start = time.perf_counter()
    epoch_seconds(compiled_model, compiled, images, labels, 0)  # compiles
    warmup = time.perf_counter() - start
    seconds = {"eager": [], "compiled": []}
    for rep in range(1, args.repeats + 1):
        seconds["eager"].append(epoch_seconds(eager, eager, images, labels, rep))
        seconds["compiled"].append(epoch_seconds(compiled_model, compiled, images, labels, rep))
        print(
            f"repeat {rep}: eager {seconds['eager'][-1]:.2f} s, compiled {seconds['compiled'][-1]:.2f} s",
            flush=True,
        )
    result = {k: statistics.median(v) for k, v in seconds.items()}
    result.update(
        first_compiled_epoch_seconds=warmup,
        images=len(images),
        data=source,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
