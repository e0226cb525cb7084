"""The feature cache's one pass over the images at 224 px, by batch size, against the whole
network's forward pass on pre-resized batches of 32 (bench.py's "limit").

    python benchmarks/prefix_batch.py [--images 160] [--rounds 3] [--suffix]

Lite0 (random weights: speed doesn't depend on them) frozen but for its last 4 blocks; one
warm-up pass of every case, then interleaved rounds; the median images/s of each. Run it on an
otherwise idle machine. --suffix: the other side of the cache, the forward pass of the last 4
blocks and the head over the cached outputs (what measures the training and validation sets after
every epoch), by batch size, on 1,000 rows (the images' outputs repeated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench
import torch

from stages.networks import feature_cache, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--suffix", action="store_true")
    args = parser.parse_args()
    n, size, frozen = args.images, 224, "all_but_last_4"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    model, _ = bench.lite0(size, frozen, freeze_bn=False)
    prefix, _ = feature_cache.split(model, "efficientnet_lite0", frozen)

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    if not args.suffix:
        whole = bench.network(bench.lite0(size)[0])
        batches = bench.resized_batches(images, labels, size, 32)
        cases = {"whole network, pre-resized, batch 32": lambda: bench.time_forward(whole, batches)}
        for batch in (50, 32, 16, 8):
            cases[f"prefix pass, batch {batch}"] = lambda b=batch: timed(
                lambda: predict.predict(prefix, images, batch_size=b)
            )
    else:
        _, suffix = feature_cache.split(model, "efficientnet_lite0", frozen)
        rows = predict.predict(prefix, images, batch_size=8).repeat(1000 // n + 1, 1, 1, 1)[:1000]
        n = len(rows)
        cases = {
            f"suffix over cached rows, batch {batch}{' (before)' if batch == 1000 else ''}": (
                lambda b=batch: timed(lambda: predict.predict(suffix, rows, batch_size=b))
            )
            for batch in (1000, 250, 50, 8)
        }
    for case in cases.values():  # warm-up: every shape once
        case()
    seen = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            seen[name].append(n / case())
    for name, values in seen.items():
        print(f"{name}: {statistics.median(values):.1f} images/s {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
