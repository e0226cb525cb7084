"""Stage `train`: build the model, train, validate every epoch, log it all to one MLflow run.

Reads params: seed, model.*, train.*, augment.flip/crop_padding/online, mlflow.*.
Writes models/model.pt (state dict + the params it was trained with), models/run.json (the MLflow
run id, for evaluate), metrics/train.json and reports/train_curves.{csv,png}.

The training set stays in memory as a uint8 tensor; each epoch augments it whole (when
augment.online is on), shuffles it with a generator seeded from (seed, epoch), and walks it in
batches. Every epoch is then measured in eval mode on the clean training and validation sets, so
`train_accuracy - val_accuracy` is the generalization gap as the model stands, not a running
average blurred by dropout and augmentation.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from stages import errors, io as sio, models, params as P, tracking
from stages.data import Policy, augment, epoch_generator, load_split, to_float

PREPARED = Path("data/prepared")
MODEL = Path("models/model.pt")
RUN = Path("models/run.json")
METRICS = Path("metrics/train.json")
CURVES = Path("reports/train_curves.csv")
CURVES_PNG = Path("reports/train_curves.png")
CURVE_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def main() -> None:
    params = P.load()
    torch.set_num_threads(params.train.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(params.seed)

    train_x, train_y = load_split(PREPARED, "train")
    val_x, val_y = load_split(PREPARED, "val")
    meta = sio.read_json(PREPARED / "meta.json")
    model = models.build(params.model, len(meta["classes"]), image_size=train_x.shape[-1])
    optimizer = make_optimizer(params.train, model)
    policy = Policy.from_params(params.augment) if params.augment.online else Policy()

    history: list[dict] = []
    with tracking.start_run(params, meta.get("source_sha256")) as run:
        tracking.log_metrics({"num_parameters": models.count_parameters(model)})
        for epoch in range(1, params.train.epochs + 1):
            start = time.perf_counter()
            batch_loss = train_one_epoch(model, train_x, train_y, optimizer, params.train.batch_size,
                                         policy, epoch_generator(params.seed, epoch),
                                         desc=f"epoch {epoch}/{params.train.epochs}")
            seconds = time.perf_counter() - start
            row = {"epoch": epoch, **measure(model, train_x, train_y, "train"),
                   **measure(model, val_x, val_y, "val")}
            history.append(row)
            tracking.log_metrics({**row, "train_batch_loss": batch_loss, "epoch_seconds": seconds,
                                  "gap": row["train_accuracy"] - row["val_accuracy"]}, step=epoch)
            print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
                  f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  {seconds:.1f}s",
                  flush=True)

        best = max(history, key=lambda r: (r["val_accuracy"], -r["epoch"]))
        final = history[-1]
        summary = {**{k: final[k] for k in CURVE_COLUMNS[1:]}, "epochs_run": len(history),
                   "best_epoch": best["epoch"], "num_parameters": models.count_parameters(model)}
        sio.save_torch(MODEL, {"state_dict": model.state_dict(), "params": params.model_dump(),
                               "classes": meta["classes"], "epoch": final["epoch"]})
        sio.write_json(METRICS, summary)
        sio.write_text(CURVES, curves_csv(history))
        save_curves_png(history)
        sio.write_json(RUN, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})

        tracking.log_metrics({f"final_{k}": v for k, v in summary.items()})
        for path in [P.PARAMS_FILE, METRICS, CURVES, CURVES_PNG]:
            tracking.log_artifact(path)
        tracking.log_model(model.eval(), to_float(val_x[:2]))


def make_optimizer(train: P.Train, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    optimizer: torch.optim.Optimizer, batch_size: int, policy: Policy,
                    generator: torch.Generator, desc: str = "") -> float:
    """One pass over the (augmented, shuffled) training set; returns the mean batch loss."""
    model.train()
    if policy.active:
        images = augment(images, policy, generator)
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    bar = tqdm(range(0, len(images), batch_size), desc=desc, leave=False,
               disable=not sys.stderr.isatty())
    for start in bar:
        idx = order[start:start + batch_size]
        loss = F.cross_entropy(model(to_float(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(images)


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict:
    loss, accuracy = models.loss_and_accuracy(models.predict(model, images), labels)
    return {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}


def curves_csv(history: list[dict]) -> str:
    lines = [",".join(CURVE_COLUMNS)]
    lines += [",".join(repr(row[c]) for c in CURVE_COLUMNS) for row in history]
    return "\n".join(lines) + "\n"


def save_curves_png(history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in history], marker=".", label=split)
        acc_ax.plot(epochs, [r[f"{split}_accuracy"] for r in history], marker=".", label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    sio.save_figure(CURVES_PNG, fig)
    plt.close(fig)


if __name__ == "__main__":
    errors.run(main)
