"""How fast is an epoch? The source's loop, the pipeline's own, and the machine's limit.

    python benchmarks/bench.py [--repeats 5] [--out reports/benchmark.json]   (make bench)

In one process, on the same 50,000 training images, the same `net` and batch size 100, repeats
interleaved (so drifts of a shared machine hit every variant alike), it times one epoch of:

  source_loop    the source document's loop as written: a DataLoader over a dataset that does
                 what torchvision's CIFAR10 does per sample (PIL image → transform → tensor)
  pipeline       the train stage's own `train_one_epoch` on in-memory uint8 tensors
  compute_limit  forward, backward and step over pre-made float batches: the practical limit

and the same three with crop (padding 4) + horizontal flip: torchvision's per-sample RandomCrop +
RandomHorizontalFlip for the source loop, the pipeline's batched augmentation for `pipeline_aug`,
and, for `compute_limit_aug`, pre-made batches of already augmented images (no augmentation cost).
Figures are images per second, medians over the repeats. Also timed: MLflow logging per epoch,
each stage's start-up (importing its module) and a no-op `dvc repro`.

    python benchmarks/bench.py --lite0 --images 500 [--threads 1]   (reports/benchmark_lite0.{json,md})

times EfficientNet-Lite0 instead, at 64, 128 and 224 pixels (model.input_size), batch 32: training
(train_one_epoch) and evaluation (predict.predict) against the same network's limit on pre-made
batches at that size; then the linear probe at 224 pixels, one head-only epoch recomputing the
frozen backbone against one on its cached outputs (train.feature_cache); then partial
fine-tuning at 224 pixels (the last 1, 2, 4, 6 blocks train): the prefix's one-time pass, an epoch
on the cache and one recomputing the prefix, and the cache's size.

Data: data/raw/ when a pipeline run left it, else the bundled datasets/cifar10-jpg.tar.gz, else a
synthetic set of the same shape (random pixels, random labels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import params as P, train  # noqa: E402
from stages.data import Policy, augment, epoch_generator, to_float  # noqa: E402
from stages.networks import feature_cache, freeze, predict, small  # noqa: E402
from stages.networks.build import build_model, network  # noqa: E402

BUNDLED = REPO / P.BUNDLED  # the real CIFAR-10 that ships with the repository
BATCH = 100


class SourceDataset(Dataset):
    """What torchvision.datasets.CIFAR10.__getitem__ does: HWC uint8 → PIL → transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images_hwc, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    raw = REPO / "data" / "raw"
    if (raw / "train_images.npy").exists():
        images, labels = np.load(raw / "train_images.npy"), np.load(raw / "train_labels.npy")
        if images.shape[1:] == (3, 32, 32):
            return torch.from_numpy(images), torch.from_numpy(labels), f"{raw} (from the pipeline)"
    if BUNDLED.exists():
        from stages.download import read_image_folder

        arrays, _ = read_image_folder(BUNDLED, 32)
        return (
            torch.from_numpy(arrays["train_images"]),
            torch.from_numpy(arrays["train_labels"]),
            str(BUNDLED),
        )
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (50_000,), generator=g),
        "synthetic (random pixels)",
    )


CPU = torch.device("cpu")


def fresh_model_and_optimizer(device: torch.device = CPU):
    torch.manual_seed(0)
    model = small.Net(10)
    if device.type == "cuda":  # as the train stage puts it there
        model.to(device, memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)


def synchronize(device: torch.device) -> None:
    """On a GPU, wait for the queued work, so that a timer reads what it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_source_loop(images, labels, aug: bool) -> float:
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if aug else []
    dataset = SourceDataset(
        images.permute(0, 2, 3, 1).contiguous().numpy(),
        labels.numpy(),
        transforms.Compose(steps + [transforms.ToTensor()]),
    )
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    model, optimizer = fresh_model_and_optimizer()
    criterion = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for inputs, targets in loader:  # the source's loop, line for line
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def time_pipeline(images, labels, aug: bool, epoch: int) -> float:
    """train_one_epoch, as the train stage runs it, on the device the images are on."""
    model, _ = fresh_model_and_optimizer(images.device)
    policy = Policy(flip=True, crop_padding=4) if aug else Policy()
    return time_epoch(model, images, labels, policy, epoch)


def time_epoch(model, images, labels, policy=None, epoch=1, batch=BATCH) -> float:
    """Seconds of one train_one_epoch of `model` (SGD, lr 0.001), as the train stage runs it."""
    device = images.device
    params = P.Train(lr=0.001, momentum=0.9, batch_size=batch)
    optimizer = train.make_optimizer(params, model)
    scheduler = train.make_scheduler(params, optimizer, math.ceil(len(images) / batch))
    loss_fn = train.make_loss(params, model, None)
    synchronize(device)
    start = time.perf_counter()
    recipe = train.Recipe(optimizer, scheduler, loss_fn, batch, policy or Policy())
    train.train_one_epoch(model, images, labels, recipe, epoch_generator(0, epoch))
    synchronize(device)
    return time.perf_counter() - start


def premade_batches(images, labels, aug: bool):
    """Float batches made in advance, where the images are (channels-last on a GPU)."""
    if aug:
        images = augment(images, Policy(flip=True, crop_padding=4), epoch_generator(0, 99))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    order = order.to(images.device)
    memory_format = torch.channels_last if images.is_cuda else torch.contiguous_format
    return [
        (
            to_float(images[order[i : i + BATCH]]).contiguous(memory_format=memory_format),
            labels[order[i : i + BATCH]],
        )
        for i in range(0, len(images), BATCH)
    ]


def time_compute(batches, model=None) -> float:
    """Forward, backward and step over pre-made batches (bf16 autocast on a GPU, as in training);
    of `net`, or of `model` (SGD, lr 0.001, momentum 0.9)."""
    device = batches[0][0].device
    if model is None:
        model, optimizer = fresh_model_and_optimizer(device)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    synchronize(device)
    start = time.perf_counter()
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


LITE0_SIZES = (64, 128, 224)  # pixels the network sees (model.input_size)
LITE0_BATCH = 32


def lite0(size: int, frozen: str = "none", freeze_bn: bool | None = None):
    """EfficientNet-Lite0 for 10 classes at `size` pixels, as the train stage sets it up (random
    weights: speed doesn't depend on them); with model.freeze = `frozen` (and freeze_bn, by
    default when something is frozen)."""
    if freeze_bn is None:
        freeze_bn = frozen != "none"
    params = P.parse(
        {
            "model": {
                "name": "efficientnet_lite0",
                "input_size": size,
                "freeze": frozen,
                "freeze_bn": freeze_bn,
            }
        }
    )
    torch.manual_seed(0)
    model = build_model(params, 10, image_size=32)
    if frozen != "none":
        for q in freeze.frozen_parameters(network(model), "efficientnet_lite0", frozen):
            q.requires_grad_(False)
        freeze.hold_frozen_in_eval(network(model), "efficientnet_lite0", frozen)
    return model, params


def resized_batches(images, labels, size: int, batch: int):
    """Pre-made float batches already resized to size×size and normalized as Lite0 expects."""
    model, _ = lite0(size)
    prepare = feature_cache.Prepare(model)
    with torch.no_grad():
        return [
            (prepare(to_float(images[i : i + batch])), labels[i : i + batch])
            for i in range(0, len(images), batch)
        ]


def time_forward(net, batches) -> float:
    """Forward only, in eval mode and without gradients, over pre-made batches."""
    net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    return time.perf_counter() - start


def time_lite0(images, labels, sizes=LITE0_SIZES) -> dict:
    """Images/s of Lite0 at each size: training (train_one_epoch, everything trained) and
    evaluation (predict.predict, as the per-epoch measurement runs it), each against the same
    network's limit on pre-made batches at that size (forward + backward + step; forward only).
    Then the linear probe at the largest size: one head-only epoch that recomputes the frozen
    backbone, against one on its cached outputs (and the one-off cost of computing them)."""
    n, rows = len(images), {}
    for size in sizes:
        batches = resized_batches(images, labels, size, LITE0_BATCH)
        model, _ = lite0(size)
        rows[f"train_{size}"] = n / time_epoch(model, images, labels, batch=LITE0_BATCH)
        rows[f"train_limit_{size}"] = n / time_compute(batches, network(lite0(size)[0]))
        start = time.perf_counter()
        predict.predict(model, images, batch_size=LITE0_BATCH)
        rows[f"eval_{size}"] = n / (time.perf_counter() - start)
        rows[f"eval_limit_{size}"] = n / time_forward(network(model), batches)
        print(", ".join(f"{k} {v:.1f}" for k, v in rows.items() if k.endswith(str(size))))
    size = max(sizes)
    model, params = lite0(size, "backbone")
    recompute = time_epoch(model, images, labels, batch=LITE0_BATCH)
    prefix, suffix = feature_cache.split(model, "efficientnet_lite0", "backbone")
    start = time.perf_counter()
    cached = predict.predict(prefix, images, batch_size=feature_cache.PREFIX_BATCH)
    rows["probe_cache_fill_seconds"] = time.perf_counter() - start
    from_cache = time_epoch(suffix, cached, labels, batch=LITE0_BATCH)
    rows[f"probe_recompute_{size}"] = n / recompute
    rows[f"probe_cached_{size}"] = n / from_cache
    rows["probe_speedup"] = recompute / from_cache
    return rows


PARTIAL_DEPTHS = (1, 2, 4, 6)  # model.freeze = all_but_last_<N>: the last N blocks train


def time_partial(images, labels, size: int = 224) -> dict:
    """Partial fine-tuning at `size` pixels on the feature cache, for each depth N: the frozen
    prefix's one-time pass over the images (images/s; the whole network's forward-only limit at
    that size is the bound), one epoch of the last N blocks and the head on its outputs, one
    epoch recomputing the prefix instead (what online augmentation costs: the cache can't apply
    then), and what the cache holds per image."""
    n = len(images)
    batches = resized_batches(images, labels, size, LITE0_BATCH)
    rows = {"forward_limit": n / time_forward(network(lite0(size)[0]), batches)}
    for depth in PARTIAL_DEPTHS:
        frozen = f"all_but_last_{depth}"
        model, _ = lite0(size, frozen, freeze_bn=False)  # the trained blocks' batch norm adapts
        prefix, suffix = feature_cache.split(model, "efficientnet_lite0", frozen)
        start = time.perf_counter()
        cached = predict.predict(prefix, images, batch_size=feature_cache.PREFIX_BATCH)
        rows[f"prefix_{depth}"] = n / (time.perf_counter() - start)
        rows[f"cached_epoch_{depth}"] = n / time_epoch(suffix, cached, labels, batch=LITE0_BATCH)
        rows[f"recompute_epoch_{depth}"] = n / time_epoch(model, images, labels, batch=LITE0_BATCH)
        rows[f"cache_bytes_per_image_{depth}"] = cached[0].numel() * cached.element_size()
        print(", ".join(f"{k} {v:.1f}" for k, v in rows.items() if k.endswith(f"_{depth}")))
    return rows


def partial_markdown(r: dict, size: int = 224) -> str:
    lines = [
        f"Partial fine-tuning at {size} px (model.freeze = all_but_last_N), images/s; the "
        f"whole network's forward-only limit is {r['forward_limit']:.1f}:",
        "",
        "| N blocks train | prefix, once | × limit | epoch on the cache | epoch recomputing "
        "(online augmentation) | cache per image | for 10,000 images |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in PARTIAL_DEPTHS:
        per_image = r[f"cache_bytes_per_image_{d}"]
        lines.append(
            f"| {d} | {r[f'prefix_{d}']:.1f} | {r[f'prefix_{d}'] / r['forward_limit']:.2f} | "
            f"{r[f'cached_epoch_{d}']:,.0f} | {r[f'recompute_epoch_{d}']:.1f} | "
            f"{per_image / 1024:.1f} KiB | {per_image * 10_000 / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def lite0_markdown(r: dict, sizes=LITE0_SIZES) -> str:
    lines = [
        "| pixels | training images/s | × its limit | evaluation images/s | × its limit |",
        "|---|---|---|---|---|",
    ]
    for s in sizes:
        lines.append(
            f"| {s} | {r[f'train_{s}']:.1f} | {r[f'train_{s}'] / r[f'train_limit_{s}']:.2f} | "
            f"{r[f'eval_{s}']:.1f} | {r[f'eval_{s}'] / r[f'eval_limit_{s}']:.2f} |"
        )
    s = max(sizes)
    lines += [
        "",
        f"Linear probe at {s} px, one head-only epoch: {r[f'probe_recompute_{s}']:.1f} images/s "
        f"recomputing the frozen backbone, {r[f'probe_cached_{s}']:,.0f} from the feature cache: "
        f"{r['probe_speedup']:.0f}× (goal >= 20×); filling the cache once took "
        f"{r['probe_cache_fill_seconds']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def main_lite0(images, labels, source: str, out: Path) -> None:
    """--lite0: the Lite0 rows only, into reports/benchmark_lite0.{json,md}."""
    result = time_lite0(images, labels)
    result["partial"] = time_partial(images, labels)
    result["setup"] = {
        "images": len(images),
        "data": source,
        "batch_size": LITE0_BATCH,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = lite0_markdown(result) + "\n" + partial_markdown(result["partial"])
    out.with_suffix(".md").write_text(table)
    print(table)


def time_mlflow_logging(repeats: int = 20) -> float:
    """Seconds to log one epoch's metrics (what train logs per epoch) to a fresh SQLite store."""
    import mlflow

    from stages.tracking import runs  # sets MLflow's environment first

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run():
            row = {
                k: 0.5
                for k in (
                    "train_loss",
                    "train_accuracy",
                    "val_loss",
                    "val_accuracy",
                    "train_batch_loss",
                    "epoch_seconds",
                    "gap",
                    "lr",
                )
            }
            times = []
            for step in range(repeats):
                start = time.perf_counter()
                runs.log_metrics(row, step=step)
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_startups(repeats: int = 5) -> dict[str, float]:
    """Seconds from process start to a stage's first work: importing its module (median)."""
    stages = ("check", "download", "augment", "train", "evaluate")
    times: dict[str, list[float]] = {s: [] for s in stages}
    for _ in range(repeats):
        for stage in stages:  # interleaved
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import stages.{stage}"], cwd=REPO, check=True)
            times[stage].append(time.perf_counter() - start)
    return {s: statistics.median(v) for s, v in times.items()}


def time_noop_repro(repeats: int = 3) -> float:
    """`dvc repro` on an up-to-date pipeline, in a scratch clone with tiny data."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY, copy_repo, make_cifar_pickle_archive, write_params

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_ROOT", None)
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo")
        archive = make_cifar_pickle_archive(Path(tmp) / "tiny.tar.gz")
        write_params(repo, **{**TINY, "data.source": str(archive)})
        run = lambda *cmd: subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        run("git", "init", "-q")
        run("dvc", "repro")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run("dvc", "repro")
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--images", type=int, default=50_000, help="epoch size (fewer for a smoke test)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmark.json")
    parser.add_argument(
        "--lite0",
        action="store_true",
        help="only EfficientNet-Lite0 at 64/128/224 px and the cached linear probe "
        "(reports/benchmark_lite0.{json,md}; use --images: 224 px trains ~3 images/s per thread)",
    )
    parser.add_argument("--threads", type=int, default=0, help="0 = every core this may use")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))

    images, labels, source = load_data()
    images, labels = images[: args.images].contiguous(), labels[: args.images].contiguous()
    n = len(images)
    print(f"data: {n} images from {source}; {torch.get_num_threads()} threads", flush=True)
    if args.lite0:
        main_lite0(images, labels, source, args.out.with_name("benchmark_lite0.json"))
        return
    batches = {
        False: premade_batches(images, labels, False),
        True: premade_batches(images, labels, True),
    }

    seconds: dict[str, list[float]] = {
        k: []
        for k in (
            "source_loop",
            "pipeline",
            "compute_limit",
            "source_loop_aug",
            "pipeline_aug",
            "compute_limit_aug",
        )
    }
    for rep in range(args.repeats):
        for aug in (False, True):
            suffix = "_aug" if aug else ""
            seconds["source_loop" + suffix].append(time_source_loop(images, labels, aug))
            seconds["pipeline" + suffix].append(time_pipeline(images, labels, aug, epoch=rep + 1))
            seconds["compute_limit" + suffix].append(time_compute(batches[aug]))
        print(
            f"repeat {rep + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()),
            flush=True,
        )

    result = {k: n / statistics.median(v) for k, v in seconds.items()}  # images per second
    result["seconds_per_epoch"] = {k: statistics.median(v) for k, v in seconds.items()}
    result["mlflow_log_seconds_per_epoch"] = time_mlflow_logging()
    result["stage_startup_seconds"] = time_startups()
    result["noop_dvc_repro_seconds"] = time_noop_repro()
    result["setup"] = {
        "images": n,
        "data": source,
        "model": "net",
        "batch_size": BATCH,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)


def markdown(r: dict) -> str:
    limit = r["compute_limit"]
    rows = [
        ("source_loop", "the source's loop (DataLoader, per-sample PIL → ToTensor)"),
        ("pipeline", "the pipeline's epoch (in-memory uint8 tensors)"),
        ("compute_limit", "forward + backward + step on pre-made batches"),
        ("source_loop_aug", "source loop + per-sample RandomCrop(pad 4) + RandomHorizontalFlip"),
        ("pipeline_aug", "pipeline + batched crop (pad 4) + flip"),
        ("compute_limit_aug", "pre-made batches of augmented images"),
    ]
    lines = [
        "| variant | what | images/s | s/epoch | × source loop | × compute limit |",
        "|---|---|---|---|---|---|",
    ]
    for key, what in rows:
        base = r["source_loop_aug" if key.endswith("_aug") else "source_loop"]
        lines.append(
            f"| `{key}` | {what} | {r[key]:,.0f} | {r['seconds_per_epoch'][key]:.2f} | "
            f"{r[key] / base:.2f} | {r[key] / limit:.2f} |"
        )
    startup = ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_startup_seconds"].items())
    lines += [
        "",
        f"MLflow logging per epoch: {1000 * r['mlflow_log_seconds_per_epoch']:.1f} ms. "
        f"Stage start-up (import, median of 5; goal <= 2.5 s): {startup}. "
        f"No-op `dvc repro`: {r['noop_dvc_repro_seconds']:.1f} s.",
        "",
        f"Augmentation at the compute limit: pipeline_aug / compute_limit_aug = "
        f"{r['pipeline_aug'] / r['compute_limit_aug']:.2f} (goal >= 0.95).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
