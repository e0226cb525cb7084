"""On a GPU: the fast-gpu preset through the train stage's own code, and the `net` epoch against
the GPU's compute limit.

    python benchmarks/gpu.py [--runs 2] [--epochs 24] [--repeats 3] [--out reports/gpu.json]

Needs no MLflow and no DVC (a bare GPU machine may have neither): it prepares the data with the
download and augment stages' own main() when data/prepared/ is missing (params.yaml's data
section: the bundled CIFAR-10, 49,000 training and 1,000 validation images), then

  preset   trains `stages/experiments/presets/fast-gpu.yaml` with train's own functions
           (set_up_model, to_device, set_up_training, train_one_epoch, measure), seed 0, `--runs`
           times, and measures the 10,000 test images: test accuracy, seconds of each epoch's
           training (CUDA-synchronized; the clean-set measurements after each epoch are timed
           apart), and whether the runs agree bit for bit;
  net      one epoch of the source's `net` (batch 100, lr 0.001) through train_one_epoch against
           forward + backward + step over pre-made GPU batches, with and without crop + flip,
           repeats interleaved, medians: the rows of `make bench` on the GPU.

Writes the figures as JSON (`--out`) and prints them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench  # noqa: E402  the net epoch rows, here on the GPU

from stages import params as P, train  # noqa: E402
from stages.data import load_split  # noqa: E402
from stages.networks import predict  # noqa: E402

PREPARED = REPO / "data" / "prepared"
RAW = REPO / "data" / "raw"
PRESET = REPO / "stages" / "experiments" / "presets" / "fast-gpu.yaml"


def prepare_data() -> None:
    """The download and augment stages, as DVC would run them (params.yaml in the repo root)."""
    if (PREPARED / "meta.json").exists():
        return
    import os

    from stages import augment as augment_stage, download

    os.chdir(REPO)
    download.main()
    augment_stage.main()


def preset_params(epochs: int | None, device: str, extra: list[str]) -> P.Params:
    changes = yaml.safe_load(PRESET.read_text())
    changes["train.device"] = device
    if epochs:
        changes["train.epochs"] = epochs
    for item in extra:  # key=value on top of the preset, as with dvc exp run -S
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    return P.parse(P.with_changes(P.read_yaml(REPO / "params.yaml"), changes))


def train_preset(params: P.Params) -> dict:
    """What train.main does, minus MLflow, checkpoints and outputs; every epoch timed."""
    proc = train.set_up_process(params)
    torch.manual_seed(params.seed)
    data = train.load_data(PREPARED)
    model = train.set_up_model(params, data)
    data, model = train.to_device(data, model, proc, params.train.compile)
    state = train.set_up_training(params, data, model)
    train_seconds, measure_seconds, history = [], [], []
    for epoch in range(1, params.train.epochs + 1):
        bench.synchronize(proc.device)
        start = time.perf_counter()
        train.run_epoch(params, data, model, state, epoch)
        bench.synchronize(proc.device)
        middle = time.perf_counter()
        row = {
            "epoch": epoch,
            **predict.measure(model.for_measuring, data.train_x, data.train_y, "train"),
            **predict.measure(model.for_measuring, data.val_x, data.val_y, "val"),
        }
        bench.synchronize(proc.device)
        train_seconds.append(middle - start)
        measure_seconds.append(time.perf_counter() - middle)
        history.append(row)
        print(
            f"  epoch {epoch:2d}: train {middle - start:.2f} s, train acc "
            f"{row['train_accuracy']:.4f}, val acc {row['val_accuracy']:.4f}",
            flush=True,
        )
    test_x, test_y = load_split(RAW, "test")
    test = predict.measure(
        model.for_measuring, test_x.to(proc.device), test_y.to(proc.device), "test"
    )
    weights = {k: v.detach().float().cpu() for k, v in model.module.state_dict().items()}
    return {
        "test_accuracy": test["test_accuracy"],
        "train_accuracy": history[-1]["train_accuracy"],
        "val_accuracy": history[-1]["val_accuracy"],
        "train_seconds_per_epoch": train_seconds,
        "measure_seconds_per_epoch": measure_seconds,
        "train_seconds_total": sum(train_seconds),
        "train_seconds_after_first_epoch": sum(train_seconds[1:]),
        "_weights": weights,
    }


def net_rows(device: torch.device, repeats: int) -> dict:
    images, labels = load_split(RAW, "train")
    images, labels = images.to(device), labels.to(device)
    n = len(images)

    batches = {aug: bench.premade_batches(images, labels, aug) for aug in (False, True)}
    bench.time_pipeline(images, labels, False, 0)  # warm-up: cuDNN's first calls
    bench.time_compute(batches[False])
    seconds = {k: [] for k in ("pipeline", "compute_limit", "pipeline_aug", "compute_limit_aug")}
    for rep in range(repeats):
        for aug in (False, True):
            suffix = "_aug" if aug else ""
            seconds["pipeline" + suffix].append(bench.time_pipeline(images, labels, aug, rep + 1))
            seconds["compute_limit" + suffix].append(bench.time_compute(batches[aug]))
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "images": n,
        "seconds_per_epoch": medians,
        "images_per_second": {k: n / v for k, v in medians.items()},
        "all_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="preset runs, same seed")
    parser.add_argument("--epochs", type=int, default=None, help="preset epochs (default: its own)")
    parser.add_argument("--repeats", type=int, default=3, help="net epochs per variant")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip", choices=["preset", "net"], action="append", default=[])
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
        help="a param on top of the preset",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gpu.json")
    args = parser.parse_args()
    prepare_data()
    device = torch.device(args.device)
    result = {
        "setup": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        }
    }
    if "preset" not in args.skip:
        params = preset_params(args.epochs, args.device, args.extra)
        runs = []
        for i in range(args.runs):
            print(f"fast-gpu preset, run {i + 1}/{args.runs}", flush=True)
            runs.append(train_preset(params))
        first = runs[0].pop("_weights")
        for run in runs[1:]:
            other = run.pop("_weights")
            run["max_weight_difference_to_run_1"] = max(
                (first[k] - other[k]).abs().max().item() for k in first
            )
        result["preset"] = {
            "epochs": params.train.epochs,
            "seed": params.seed,
            "changes": args.extra,
            "runs": runs,
        }
        write(args.out, result)  # what is measured so far survives a later failure
    if "net" not in args.skip:
        print("net epoch: pipeline against compute limit", flush=True)
        result["net"] = net_rows(device, args.repeats)
    write(args.out, result)
    print(json.dumps(result, indent=2))


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
