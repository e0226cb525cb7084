"""What does resizing inside the model cost, next to the network it feeds?

    python benchmarks/resize.py [--sizes 64,128,224] [--batch 32] [--repeats 3]

model.input_size makes `Normalized` (stages/networks/build.py) resize every batch of the data's
32×32 pixels to the network's size, bilinear with antialiasing, before normalizing. This times,
for EfficientNet-Lite0 at each size, on one batch of random 32-px images:

  resize         the resize alone (F.interpolate, exactly as Normalized calls it)
  step           a whole training step of the model as the train stage builds it: resize,
                 normalize, forward, backward (the loss's gradient) — the resize included

Medians over the repeats, the sizes interleaved so that a shared machine's drifts hit each alike;
the ratio resize / step is what to read on a busy machine, the seconds less so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import params as P
from stages.networks.build import build_model


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    models = {
        size: build_model(
            P.parse({"model": {"name": "efficientnet_lite0", "input_size": size}}), 10, 32
        ).train()
        for size in sizes
    }

    def resize(size: int) -> None:
        F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)

    def step(size: int) -> None:
        models[size].zero_grad(set_to_none=True)
        F.cross_entropy(models[size](x), y).backward()

    for size in sizes:  # warm-up: first calls allocate
        step(size)
    times: dict[int, dict[str, list[float]]] = {s: {"resize": [], "step": []} for s in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            times[size]["resize"].append(min(seconds(resize, size) for _ in range(5)))
            times[size]["step"].append(seconds(step, size))
    print(
        f"EfficientNet-Lite0, batch {args.batch} of 32-px images, {torch.get_num_threads()} threads"
    )
    print("input px | resize ms | step ms (forward + backward) | resize / step")
    for size in sizes:
        r, s = (statistics.median(times[size][k]) for k in ("resize", "step"))
        print(f"{size:8d} | {1000 * r:9.2f} | {1000 * s:28.0f} | {100 * r / s:12.2f}%")


if __name__ == "__main__":
    main()
