"""What a short OpenMP spin-wait (GOMP_SPINCOUNT=1000, the pipeline's default until 2026-12-07)
costs a training that runs alone: interleaved solo pairs.

    python benchmarks/solo_spin.py [--rounds 14]

Each round times one training alone with the short spin and one as the pipeline now runs it
(PyTorch's own settings), the order alternating, with benchmarks/threads.py's worker (`net`,
batch 100, 10,000 synthetic images, 2 epochs); prints each round's ratio and the median and
quartiles of the paired ratios. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics

import threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=14)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (quartiles of the paired ratios)")
    ratios, short, default = [], [], []
    for r in range(args.rounds):
        got = {}
        cases = {"short": threads.SHORT_SPIN, "default": threads.PIPELINE}
        for name in ("short", "default") if r % 2 == 0 else ("default", "short"):
            got[name] = threads.run([cases[name]], 10_000, 2)[0]
        short.append(got["short"])
        default.append(got["default"])
        ratios.append(got["short"] / got["default"])
        print(f"round {r}: short {short[-1]:.0f}, default {default[-1]:.0f}, {ratios[-1]:.3f}")
    q = statistics.quantiles(ratios, n=4)
    print(
        f"images/s, median: short spin {statistics.median(short):.0f}, default "
        f"{statistics.median(default):.0f}; paired ratio {statistics.median(ratios):.3f} "
        f"(quartiles {q[0]:.3f}–{q[2]:.3f}), {sum(x < 1 for x in ratios)}/{args.rounds} slower"
    )


if __name__ == "__main__":
    main()
