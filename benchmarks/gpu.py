"""On a GPU: the fast-gpu preset through the train and evaluate stages' own code, and the `net`
epoch against the GPU's compute limit.

    python benchmarks/gpu.py [--runs 2] [--epochs 24] [--repeats 3] [--out reports/gpu.json]

Needs no MLflow and no DVC (a bare GPU machine may have neither): it prepares the data with the
download and augment stages' own main() when data/prepared/ is missing (params.yaml's data
section: the bundled CIFAR-10, 49,000 training and 1,000 validation images), then

  preset   trains `stages/experiments/presets/fast-gpu.yaml` with train.main() and measures the
           10,000 test images with evaluate.main(), seed 0, `--runs` times, each in a folder of
           its own under data/gpu-bench/ (the repository's outputs stay as they are), logging
           its run to the journal data/gpu-bench/journal (tracking URI `journal:<folder>`;
           `python -m stages.tracking.replay data/gpu-bench/journal` makes them MLflow runs):
           test accuracy, the seconds of each epoch's training (the train stage's own
           `epoch_seconds` metric, read back from the journal; the clean-set measurements after
           each epoch are not in it), and whether the runs agree bit for bit;
  net      one epoch of the source's `net` (batch 100, lr 0.001) through train_one_epoch against
           forward + backward + step over pre-made GPU batches, with and without crop + flip,
           repeats interleaved, medians: the rows of `make bench` on the GPU.

Writes the figures as JSON (`--out`) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench  # noqa: E402  the net epoch rows, here on the GPU

from stages import io as sio, params as P  # noqa: E402
from stages.data import load_split  # noqa: E402
from stages.experiments import folders, plan as plans  # noqa: E402
from stages.tracking import journal  # noqa: E402

PREPARED = REPO / "data" / "prepared"
RAW = REPO / "data" / "raw"
PRESET = REPO / "stages" / "experiments" / "presets" / "fast-gpu.yaml"
WORK = REPO / "data" / "gpu-bench"
JOURNAL = f"journal:{WORK / 'journal'}"


def prepare_data() -> None:
    """The download and augment stages, as DVC would run them (params.yaml in the repo root)."""
    if (PREPARED / "meta.json").exists():
        return
    import os

    from stages import augment as augment_stage, download

    os.chdir(REPO)
    download.main()
    augment_stage.main()


def preset_params(epochs: int | None, device: str, extra: list[str]) -> dict:
    """params.yaml with the preset, the device, the epochs and `extra` on top (validated)."""
    changes = yaml.safe_load(PRESET.read_text())
    changes["train.device"] = device
    if epochs:
        changes["train.epochs"] = epochs
    changes.update(plans.parse_sets(extra))  # key=value on top of the preset, as the engine's --set
    params = P.with_changes(P.read_yaml(REPO / "params.yaml"), changes)
    P.parse(params)
    return params


def train_preset(params: dict, name: str) -> dict:
    """train.main() and evaluate.main() in the folder data/gpu-bench/<name>, as the engine runs
    an experiment without DVC (stages/experiments/folders.py), on the repository's prepared
    data; their metrics, each epoch's training seconds and the weights."""
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    os.chdir(REPO)
    folders.run_stages(
        folder, params, WORK / "journal", stages=("train", "evaluate"), linked=("prepared", "raw")
    )
    run_id = sio.read_json(folder / "models" / "run.json")["run_id"]
    train_seconds = [  # one per epoch, in order
        line["metrics"]["epoch_seconds"]
        for line in journal.reopen(JOURNAL, run_id).lines()
        if line["kind"] == "metrics" and "epoch_seconds" in line["metrics"]
    ]
    trained = sio.read_json(folder / "metrics" / "train.json")
    saved = sio.load_torch(folder / "models" / "model.pt")["state_dict"]
    return {
        "run_id": run_id,
        "test_accuracy": sio.read_json(folder / "metrics" / "eval.json")["test_accuracy"],
        "train_accuracy": trained["train_accuracy"],
        "val_accuracy": trained["val_accuracy"],
        "train_seconds_per_epoch": train_seconds,
        "train_seconds_total": sum(train_seconds),
        "train_seconds_after_first_epoch": sum(train_seconds[1:]),
        "_weights": {k: v.float() for k, v in saved.items()},
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
    args.out = args.out.resolve()  # the runs change the working folder
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
            runs.append(train_preset(params, f"run-{i + 1}"))
        os.chdir(REPO)
        first = runs[0].pop("_weights")
        for run in runs[1:]:
            other = run.pop("_weights")
            run["max_weight_difference_to_run_1"] = max(
                (first[k] - other[k]).abs().max().item() for k in first
            )
        result["preset"] = {
            "epochs": P.parse(params).train.epochs,
            "seed": P.parse(params).seed,
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
