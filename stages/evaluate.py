"""Stage `evaluate`: the trained model on the untouched test set, logged into train's MLflow run.

Reads params: evaluate.*; mlflow.tracking_uri (to find the run's store) and train.feature_cache
(whether the test set's frozen prefix comes from the cache), neither a DVC param: they change
where the metrics are logged and how they are computed, not what they are. The model runs on the
device it was trained on (its train.device: auto = the GPU when there is one).
Writes metrics/eval.json: test loss and accuracy (and each auxiliary task's, for a multi-task
model), per-class accuracy, the generalization gap
(train accuracy - test accuracy, both of the saved model in eval mode) and a diagnosis: the epoch
where validation loss started rising while training loss kept falling, and a verdict
(overfitting | underfitting | good_fit); reports/confusion.csv (one row per test image, for
`dvc plots`) and reports/confusion.png.

With evaluate.wise_alphas, WiSE-FT (Wortsman et al., CVPR 2022): for each α the backbone's
weights and batch-norm buffers become (1 − α)·pretrained + α·fine-tuned, the fine-tuned head
throughout; validation (data/prepared) and test accuracy are measured at each α, α is picked on
validation, and its test accuracy is reported (wise_alpha, wise_test_accuracy); the curve goes
to MLflow and reports/wise.png (which says "off" when wise_alphas is empty).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages import errors, io as sio, params as P
from stages.data import load_split
from stages.errors import StageError
from stages.networks import feature_cache, predict, registry, tasks, weights
from stages.networks.build import build_model, network
from stages.runtime import CoreShare, resolve_device
from stages.tracking import runs, store

RAW = Path("data/raw")
PREPARED = Path("data/prepared")  # its val split picks WiSE-FT's α
MODEL = Path("models/model.pt")
RUN = Path("models/run.json")
TRAIN_METRICS = Path("metrics/train.json")
CURVES = Path("reports/train_curves.csv")
METRICS = Path("metrics/eval.json")
CONFUSION_CSV = Path("reports/confusion.csv")
CONFUSION_PNG = Path("reports/confusion.png")
PREVIEW = Path("reports/augment_preview.png")
WISE_PNG = Path("reports/wise.png")


def main() -> None:
    params = P.load()
    store.check_reachable(store.tracking_uri(params.mlflow))  # before any work, not after it
    test_x, test_y = load_split(RAW, "test")
    model, trained_with, classes = load_model(MODEL, image_size=test_x.shape[-1])
    # its share of the cores while it computes (a train.threads the model was trained with holds)
    with CoreShare(fixed=trained_with.train.threads):
        evaluate(params, model, trained_with, classes, (test_x, test_y))


def evaluate(params: P.Params, model, trained_with: P.Params, classes: list[str], test_set) -> None:
    test_x, test_y = test_set
    device = resolve_device(trained_with.train.device)
    model.to(device)  # the images stay on the CPU: predict moves each batch
    alphas = params.evaluate.wise_alphas
    if alphas:  # the pretrained weights, before any work
        if trained_with.model.pretrained == "none":
            raise StageError(
                "evaluate.wise_alphas: the model was trained without pretrained weights "
                "(model.pretrained none): there is nothing to interpolate towards"
            )
        pretrained, _ = weights.load_weights(
            trained_with.model.pretrained,
            trained_with.model.name,
            store.tracking_uri(params.mlflow),
        )
    use_cache = params.train.feature_cache
    metrics, matrix, predicted = test(
        model, trained_with, classes, test_x, test_y, params.evaluate, use_cache
    )
    if alphas:
        val = load_split(PREPARED, "val")
        metrics.update(
            wise_ft(model, trained_with.model.name, pretrained, alphas, val, (test_x, test_y))
        )
    write_outputs(metrics, matrix, classes, test_y, predicted)
    log_to_run(metrics, classes, params.mlflow)
    print(
        f"evaluate: test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}, "
        f"gap {metrics['generalization_gap']:+.4f}: {metrics['verdict']}"
    )
    if alphas:
        best = (
            "α = 1, plain fine-tuning, was best"
            if metrics["wise_fine_tuned_best"]
            else f"fine-tuned (α = 1): {metrics['wise_curve']['alpha_100']['test_accuracy']:.4f}"
        )
        print(
            f"evaluate: WiSE-FT α = {metrics['wise_alpha']:g} (best validation accuracy, "
            f"{metrics['wise_val_accuracy']:.4f}): test accuracy "
            f"{metrics['wise_test_accuracy']:.4f}; {best}"
        )


def load_model(path: Path, image_size: int):
    """The trained model, the params it was trained with, and its classes."""
    checkpoint = sio.load_torch(path)
    trained_with = P.parse(checkpoint["params"])
    classes = checkpoint["classes"]
    model = build_model(trained_with, len(classes), image_size=image_size)
    model.load_state_dict(checkpoint["state_dict"])
    return model, trained_with, classes


def test(
    model,
    trained_with: P.Params,
    classes: list[str],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    thresholds: P.Evaluate,
    use_cache: bool = True,
):
    """metrics/eval.json's content, the confusion matrix and the predicted classes."""
    multitask = isinstance(model, tasks.MultiTask)
    # a frozen prefix's outputs come from the feature cache when it applies (train.feature_cache)
    outputs = feature_cache.test_logits(model, trained_with, test_x) if use_cache else None
    if outputs is None:
        outputs = predict.predict(model, test_x, all_tasks=multitask)  # every head in one pass
    logits = outputs["main"] if multitask else outputs
    test_loss, test_accuracy = predict.loss_and_accuracy(logits, test_y)
    aux = {}  # a multi-task model's test_<task>_loss and test_<task>_accuracy
    if multitask:
        measured = predict.measure(
            model,
            test_x,
            test_y,
            "test",
            tasks.coarse_mapping_if_on(trained_with.tasks, classes),
            outputs,
        )
        aux = {k: v for k, v in measured.items() if k not in ("test_loss", "test_accuracy")}
    predicted = logits.argmax(1)
    matrix = confusion_matrix(test_y, predicted, len(classes))
    per_class = (matrix.diagonal() / matrix.sum(1).clip(min=1)).tolist()
    trained = sio.read_json(TRAIN_METRICS)
    gap = trained["train_accuracy"] - test_accuracy
    metrics = {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        **aux,
        "generalization_gap": gap,
        "per_class_accuracy": dict(zip(classes, per_class)),
        "best_epoch": trained["best_epoch"],
        "overfitting_epoch": overfitting_epoch(read_curves(CURVES)),
        "verdict": verdict(trained["train_accuracy"], gap, thresholds),
    }
    return metrics, matrix, predicted


def wise_ft(
    model: torch.nn.Module,
    name: str,
    pretrained: dict,
    alphas: list[float],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """WiSE-FT: accuracy on `val` and `test` with the backbone at (1 − α)·pretrained +
    α·fine-tuned for each α (and α = 1, the model as trained, for comparison); α is picked on
    validation, ties going to the larger α (nearer the model as trained). The head stays the
    fine-tuned one: the pretrained head, if any, is for other classes. The model is left as
    trained."""
    net = network(model)
    fine_tuned = {k: v.clone() for k, v in net.state_dict().items()}
    head = registry.network(name).head + "."
    curve = {}
    for alpha in sorted({*alphas, 1.0}):
        mixed = {  # lerp is exact at its ends: α = 0 gives the pretrained weights bit for bit
            k: torch.lerp(pretrained[k].to(v), v, alpha) if v.is_floating_point() else v
            for k, v in fine_tuned.items()
            if not k.startswith(head)
        }
        weights.load_into(net, mixed, name)
        curve[f"alpha_{round(100 * alpha):03d}"] = {  # alpha_000 … alpha_100: in order in JSON
            "alpha": alpha,
            "val_accuracy": predict.loss_and_accuracy(predict.predict(model, val[0]), val[1])[1],
            "test_accuracy": predict.loss_and_accuracy(predict.predict(model, test[0]), test[1])[1],
        }
    net.load_state_dict(fine_tuned)
    best = max(curve.values(), key=lambda row: (row["val_accuracy"], row["alpha"]))
    return {
        "wise_alpha": best["alpha"],
        "wise_val_accuracy": best["val_accuracy"],
        "wise_test_accuracy": best["test_accuracy"],
        "wise_fine_tuned_best": best["alpha"] == 1.0,
        "wise_curve": curve,
    }


def write_outputs(
    metrics: dict,
    matrix: np.ndarray,
    classes: list[str],
    test_y: torch.Tensor,
    predicted: torch.Tensor,
) -> None:
    sio.write_json(METRICS, metrics)
    sio.write_text(
        CONFUSION_CSV,
        "actual,predicted\n"
        + "".join(
            f"{classes[a]},{classes[p]}\n" for a, p in zip(test_y.tolist(), predicted.tolist())
        ),
    )
    save_confusion_png(matrix, classes, metrics["test_accuracy"])
    save_wise_png(metrics)


def log_to_run(metrics: dict, classes: list[str], mlflow_params: P.Mlflow) -> None:
    """Into train's MLflow run: the test metrics, the verdict, the reports."""
    aux = {
        k: v
        for k, v in metrics.items()
        if k.startswith("test_") and k not in ("test_accuracy", "test_loss")
    }
    with runs.resume_run(sio.read_json(RUN)["run_id"], mlflow_params):
        runs.log_metrics(
            {
                "test_accuracy": metrics["test_accuracy"],
                "test_loss": metrics["test_loss"],
                **aux,
                "generalization_gap": metrics["generalization_gap"],
                "overfitting_epoch": metrics["overfitting_epoch"] or 0,
            }
        )
        runs.set_tags({"verdict": metrics["verdict"]})
        if "wise_curve" in metrics:  # the curve by step = 100·α, then the pick
            for row in metrics["wise_curve"].values():
                runs.log_metrics(
                    {
                        "wise_curve_val_accuracy": row["val_accuracy"],
                        "wise_curve_test_accuracy": row["test_accuracy"],
                    },
                    step=round(100 * row["alpha"]),
                )
            runs.log_metrics(
                {k: metrics[k] for k in ("wise_alpha", "wise_val_accuracy", "wise_test_accuracy")}
            )
            runs.set_tags({"wise_fine_tuned_best": str(metrics["wise_fine_tuned_best"]).lower()})
        runs.log_metrics({f"test_accuracy.{c}": metrics["per_class_accuracy"][c] for c in classes})
        for path in [METRICS, CONFUSION_CSV, CONFUSION_PNG, PREVIEW, WISE_PNG]:
            if path.exists():
                runs.log_artifact(path)


def read_curves(path: Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]


def overfitting_epoch(curves: list[dict]) -> int | None:
    """The epoch of lowest validation loss, if after it validation loss rose while training loss
    kept falling (both at the last epoch against that one); None if that never happened."""
    best = min(curves, key=lambda row: row["val_loss"])
    last = curves[-1]
    if last["val_loss"] > best["val_loss"] and last["train_loss"] < best["train_loss"]:
        return int(best["epoch"])
    return None


def verdict(train_accuracy: float, gap: float, thresholds: P.Evaluate) -> str:
    """underfitting: poor even on the training data; overfitting: good on the training data,
    much worse on new data; good_fit: neither."""
    if train_accuracy < thresholds.min_train_accuracy:
        return "underfitting"
    if gap > thresholds.max_gap:
        return "overfitting"
    return "good_fit"


def confusion_matrix(actual: torch.Tensor, predicted: torch.Tensor, n: int) -> np.ndarray:
    """matrix[i, j] = how many images of class i were predicted as class j."""
    return torch.bincount(actual * n + predicted, minlength=n * n).reshape(n, n).numpy()


def save_confusion_png(matrix: np.ndarray, classes: list[str], accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="actual", title=f"test accuracy {accuracy:.3f}")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    matrix[i, j],
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black",
                )
    fig.tight_layout()
    sio.save_figure(CONFUSION_PNG, fig)
    plt.close(fig)


def save_wise_png(metrics: dict) -> None:
    """Validation and test accuracy against α, the pick marked; a note when WiSE-FT is off (DVC
    expects the file either way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    if "wise_curve" in metrics:
        rows = list(metrics["wise_curve"].values())
        alphas = [row["alpha"] for row in rows]
        for split in ("val", "test"):
            ax.plot(alphas, [row[f"{split}_accuracy"] for row in rows], "o-", label=split)
        ax.axvline(metrics["wise_alpha"], color="grey", linestyle=":", label="picked on val")
        ax.set(xlabel="α (0: pretrained backbone, 1: fine-tuned)", ylabel="accuracy")
        ax.set_title(f"WiSE-FT: test accuracy {metrics['wise_test_accuracy']:.3f}", fontsize=9)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "WiSE-FT is off\n(evaluate.wise_alphas is empty)", ha="center")
        ax.set_axis_off()
    fig.tight_layout()
    sio.save_figure(WISE_PNG, fig)
    plt.close(fig)


if __name__ == "__main__":
    errors.run(main)
