"""Stage `train`: build the model, train, validate every epoch, log it all to one MLflow run.

Reads params: seed, data.normalize, model.*, train.*, augment.* (the online policy, mixup and
cutmix), tasks.* (auxiliary tasks on the same backbone: stages/networks/tasks.py), mlflow.*.
mlflow.* (where the run is logged) and train.feature_cache (how, not what, it computes) are no
DVC params of the stage: changing them reruns nothing (params.NOT_RESULT_KEYS). With the tracking
URI `journal:<folder>` (a machine without MLflow) the run is written to a journal there instead,
without importing mlflow, and replayed into MLflow later (stages/tracking/journal.py).
Writes models/model.pt (state dict + the params it was trained with), models/run.json (the MLflow
run id, for evaluate), metrics/train.json and reports/train_curves.{csv,png}.

The training set stays in memory as a uint8 tensor; each epoch augments it whole (when
augment.online is on), shuffles it with a generator seeded from (seed, epoch), and walks it in
batches. Every epoch is then measured in eval mode on the clean training and validation sets, so
`train_accuracy - val_accuracy` is the generalization gap as the model stands, not a running
average blurred by dropout and augmentation.

Distributed data-parallel training: `torchrun --nproc-per-node N -m stages.train` (or
train.nproc = N, which starts torchrun itself, so `dvc exp run -S train.nproc=2` works). Every
process holds the whole data set, draws the same epoch permutation and takes its share of each
batch (train.batch_size is the global batch: N processes of batch_size / N images, whose
gradients DDP averages, make the same step as one process); losses and metrics are summed
across processes. Only rank 0 logs to MLflow and writes the outputs. gloo on CPUs, nccl on GPUs.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from stages import averaging, errors, io as sio, params as P, regularize, sam
from stages.data import Policy, augment, epoch_generator, load_split, to_float
from stages.errors import StageError
from stages.networks import feature_cache, freeze, predict, registry, tasks, weights
from stages.networks.build import build_model, channel_mean_std, network
from stages.runtime import CoreShare, keep_fair, repo_root, resolve_device
from stages.tracking import runs, store, trial

PREPARED = Path("data/prepared")
MODEL = Path("models/model.pt")
RUN = Path("models/run.json")
METRICS = Path("metrics/train.json")
CURVES = Path("reports/train_curves.csv")
CURVES_PNG = Path("reports/train_curves.png")
CHECKPOINTS = Path("data/checkpoints")  # under the repository root; not a DVC output
CURVE_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def main() -> None:
    params = P.load()
    store.check_reachable(store.tracking_uri(params.mlflow))  # fail now, not after the data
    proc = set_up_process(params)
    with proc.cores:  # this process's share of the cores, as long as it computes
        train(params, proc)


def train(params: P.Params, proc: Process) -> None:
    torch.manual_seed(params.seed)  # the weights' initialization
    data = load_data(PREPARED)
    model = set_up_model(params, data)
    checkpoint = checkpoint_path(
        params,
        model.pretrained_info.get("sha256", ""),
        proc.world,
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
    )
    data, model = to_device(data, model, proc, params.train.compile)
    state = set_up_training(params, data, model)
    resume(state, model.module, checkpoint)
    model.cache = feature_cache.set_up(
        params,
        data.train_x,
        data.val_x,
        model.module,
        proc.world,
        proc.device.type,
        first_epoch=len(state.history) + 1,
    )
    with (
        runs.start_run(params, data.source_sha256, resume_id=state.run_id)
        if proc.logs
        else contextlib.nullcontext()
    ) as run:
        if proc.logs:
            log_start(model, proc)
            if state.run_id:  # a kill between an epoch's logging and its checkpoint
                state.logged_epochs = runs.last_step("val_accuracy")
        fit(params, data, model, state, proc, run, checkpoint, trial.for_this_run())
        if proc.logs:
            write_outputs(params, data, model, state, run)
    if proc.logs:
        checkpoint.unlink()  # finished: the outputs are written


@dataclass
class Process:
    """Where this process trains: its device, and its place among data-parallel processes."""

    device: torch.device
    cores: CoreShare
    rank: int = 0
    world: int = 1

    @property
    def logs(self) -> bool:
        """Only rank 0 talks to MLflow and writes files."""
        return self.rank == 0


def set_up_process(params: P.Params) -> Process:
    """Threads, device and distribution: under torchrun (or train.nproc > 1, which becomes
    torchrun), join the process group; on a GPU, the device of this process's local rank."""
    if int(os.environ.get("WORLD_SIZE", params.train.nproc)) > 1 and params.train.unfreeze_at_epoch:
        raise StageError(
            "train.unfreeze_at_epoch can't be used with distributed training: DDP "
            "fixes the set of trained parameters when it starts"
        )
    launch_under_torchrun(params.train.nproc)
    device = resolve_device(params.train.device)
    rank, world = start_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    # its threads: cores / the processes computing on this machine (each rank counts), or train.threads
    return Process(device, CoreShare(fixed=params.train.threads), rank, world)


@dataclass
class Data:
    train_x: torch.Tensor  # uint8, N×3×H×W
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    source_sha256: str | None  # of the data.source archive, for the MLflow tag


def load_data(folder: Path) -> Data:
    train_x, train_y = load_split(folder, "train")
    val_x, val_y = load_split(folder, "val")
    meta = sio.read_json(folder / "meta.json")
    return Data(train_x, train_y, val_x, val_y, meta["classes"], meta.get("source_sha256"))


@dataclass
class Model:
    """The model, the modules that run it, and what fine-tuning needs to know of it."""

    module: nn.Module
    """The whole model: the network in its normalization wrapper, with the auxiliary tasks' heads
    if any. What the optimizer updates, and what is saved and logged."""
    network: nn.Module
    """The network inside `module`'s normalization and multi-task wrappers: the one whose blocks
    model.freeze and train.layer_lr_decay name and whose pretrained weights are loaded."""
    head: nn.Module
    """The new classifier (and the task heads): trained at train.lr."""
    frozen: list[nn.Parameter]
    """The parameters model.freeze holds fixed, until train.unfreeze_at_epoch."""
    start_values: dict[str, torch.Tensor]
    """The pretrained values of `network`'s parameters, by name, for L2-SP (empty without)."""
    pretrained_info: dict
    """Which pretrained weights were loaded: name, source, sha256 (empty without)."""
    task_weights: dict[str, float]
    """The auxiliary tasks that are on, and their loss weights."""
    coarse: torch.Tensor | None
    """Class -> group, for the coarse task."""
    for_training: nn.Module | None = None
    """What the training steps call: `module`, compiled (train.compile) or under DDP; the cache's
    suffix on the cached features while the prefix is frozen."""
    for_measuring: nn.Module | None = None
    """What measures the splits: as `for_training` but never DDP, which would synchronize
    processes that each measure their share."""
    cache: feature_cache.Cache | None = None
    """The frozen prefix's outputs, with train.feature_cache (stages/networks/feature_cache.py)."""


def set_up_model(params: P.Params, data: Data) -> Model:
    """The network params.model names; for fine-tuning, pretrained weights for all but the new
    head, and the blocks that model.freeze holds fixed."""
    mean_std = channel_mean_std(data.train_x) if params.data.normalize == "dataset" else None
    model = build_model(
        params, len(data.classes), image_size=data.train_x.shape[-1], mean_std=mean_std
    )
    net, name = network(model), params.model.name
    loaded_weights, start_values = {}, {}
    if params.model.pretrained != "none":
        state, loaded_weights = weights.load_weights(
            params.model.pretrained, name, store.tracking_uri(params.mlflow)
        )
        loaded = weights.load_into(net, state, name)
        start_values = {k: p.detach().clone() for k, p in net.named_parameters() if k in loaded}
    task_weights = tasks.active(params.tasks)
    head = net.get_submodule(registry.network(name).head)
    if task_weights:  # the auxiliary heads are new too: they train at the head's rate
        head = nn.ModuleList([head, *model.heads.values()])
    if params.model.freeze != "none":  # frozen means frozen: batch norm statistics too
        freeze.hold_frozen_in_eval(net, name, params.model.freeze)
    return Model(
        model,
        net,
        head,
        freeze.frozen_parameters(net, name, params.model.freeze),
        start_values,
        loaded_weights,
        task_weights,
        tasks.coarse_mapping_if_on(params.tasks, data.classes),
    )


def to_device(data: Data, model: Model, proc: Process, compile: bool) -> tuple[Data, Model]:
    """On a GPU the whole data set moves there once, as uint8, and is augmented there; the
    model is compiled (train.compile) and wrapped in DDP for several processes."""
    device = proc.device
    data = replace(
        data, **{k: getattr(data, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y")}
    )
    channels_last = device.type == "cuda"
    model.module.to(
        device, memory_format=torch.channels_last if channels_last else torch.preserve_format
    )
    model.start_values = {k: v.to(device) for k, v in model.start_values.items()}
    compiled = torch.compile(model.module) if compile else model.module
    model.for_training, model.for_measuring = compiled, compiled
    if proc.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model.module)
        model.for_training = torch.compile(ddp) if compile else ddp
        model.for_measuring = model.module
    return data, model


@dataclass
class Training:
    """What the epoch loop changes, and what a resumed run takes back from the checkpoint."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable
    task_loss: tasks.TaskLoss | None
    policy: Policy  # online augmentation: the image policy, or nothing
    mixer: Callable | None  # mixup / cutmix
    stopper: EarlyStopping
    history: list[dict] = field(default_factory=list)  # one row of measurements per epoch
    best_state: dict | None = None  # the best epoch's weights, with early stopping's restore_best
    run_id: str | None = None  # the MLflow run of an interrupted training that is being resumed
    logged_epochs: int = 0  # of a resumed run: the epochs its MLflow run already has
    averaged: AveragedModel | None = None  # train.ema_decay / swa_start_epoch: the weights' average
    pruned: bool | None = None  # a search's trial: whether its pruner stopped it (else None)


def set_up_training(params: P.Params, data: Data, model: Model) -> Training:
    steps_per_epoch = math.ceil(len(data.train_x) / params.train.batch_size)
    blocks = registry.network(params.model.name).blocks(model.network)  # layer-wise lr decay
    optimizer = make_optimizer(params.train, model.module, model.head, blocks)
    class_weights = (
        regularize.balanced_class_weights(data.train_y, len(data.classes)).to(data.train_y.device)
        if params.train.class_weighting == "balanced"
        else None
    )
    return Training(
        optimizer=optimizer,
        scheduler=make_scheduler(params.train, optimizer, steps_per_epoch),
        loss_fn=make_loss(
            params.train, model.module, class_weights, model.network, model.start_values
        ),
        task_loss=(
            tasks.TaskLoss(
                model.task_weights, model.coarse, getattr(model.module, "log_vars", None)
            )
            if model.task_weights
            else None
        ),
        policy=Policy.from_params(params.augment) if params.augment.online else Policy(),
        mixer=regularize.label_mixer(
            params.augment.mixup_alpha, params.augment.cutmix_alpha, len(data.classes)
        ),
        stopper=EarlyStopping(
            **params.train.early_stopping.model_dump(exclude={"enabled", "restore_best"})
        ),
        averaged=averaging.averaged_model(
            model.module, params.train.ema_decay, params.train.swa_start_epoch
        ),
    )


def resume(state: Training, model: nn.Module, checkpoint: Path) -> None:
    """Resume after a crash or kill. The checkpoint lives outside DVC's outputs (DVC deletes those
    before rerunning the stage) and is named by everything that shapes training, so a run with
    other params or data never picks it up. Every epoch reseeds from (seed, epoch): the resumed
    run is bit-identical to an uninterrupted one."""
    if not checkpoint.exists():
        return
    saved = sio.load_torch(checkpoint)
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    vars(state.stopper).update(saved["stopper"])
    if state.averaged is not None:
        state.averaged.load_state_dict(saved["averaged"])
    state.history, state.best_state, state.run_id = (
        saved["history"],
        saved["best_state"],
        saved["run_id"],
    )
    print(f"resuming after epoch {len(state.history)} from {checkpoint}", flush=True)


def save_checkpoint(state: Training, model: nn.Module, run_id: str, checkpoint: Path) -> None:
    sio.save_torch(
        checkpoint,
        {
            "model": model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "stopper": dict(vars(state.stopper)),
            "history": state.history,
            "best_state": state.best_state,
            "averaged": state.averaged.state_dict() if state.averaged is not None else None,
            "run_id": run_id,
        },
    )


def log_start(model: Model, proc: Process) -> None:
    runs.log_metrics(
        {
            "num_parameters": predict.count_parameters(model.module),
            "world_size": proc.world,
        }
    )
    if model.pretrained_info:
        runs.set_tags({f"pretrained.{k}": v for k, v in model.pretrained_info.items()})


def fit(
    params: P.Params,
    data: Data,
    model: Model,
    state: Training,
    proc: Process,
    run,
    checkpoint: Path,
    search_trial: trial.Trial | None = None,
) -> None:
    """The epoch loop: train, measure the clean training and validation sets, stop early.
    With weight averaging, what is measured (and kept as the best epoch) is the average.
    A search's trial hears every epoch's validation accuracy, and its pruner may stop it."""
    t, stopping = params.train, params.train.early_stopping.enabled
    if search_trial is not None:
        if proc.world > 1:
            raise errors.ParamsError(
                "a search's trial trains in one process: train.nproc must be 1"
            )
        state.pruned = False
    restore_best = stopping and params.train.early_stopping.restore_best
    shard = (proc.rank, proc.world)
    for epoch in range(len(state.history) + 1, t.epochs + 1):
        if stopping and state.stopper.should_stop:
            break  # a resumed run that had already decided to stop
        still_frozen = not t.unfreeze_at_epoch or epoch < t.unfreeze_at_epoch
        for p in model.frozen:
            p.requires_grad_(not still_frozen)  # no gradient: the optimizer leaves it alone
        # while the prefix is frozen, with the cache: its outputs, and the suffix that trains on them
        seen, trained = feature_cache.for_epoch(model.cache, data, model, still_frozen)
        start = time.perf_counter()
        batch_loss = run_epoch(params, seen, trained, state, epoch, shard)
        seconds = time.perf_counter() - start
        if t.swa_start_epoch and epoch >= t.swa_start_epoch:
            state.averaged.update_parameters(model.module)  # SWA: one more epoch's weights
        # no averaging with the cache
        measured = averaging.measured(state.averaged, trained.for_measuring)
        row = {
            "epoch": epoch,
            **measure(measured, seen.train_x, data.train_y, "train", model.coarse, shard),
            **measure(measured, seen.val_x, data.val_y, "val", model.coarse, shard),
        }
        state.history.append(row)
        improved = state.stopper.update(epoch, row[state.stopper.monitor])
        if proc.logs:
            if improved and restore_best:
                kept = averaging.measured(state.averaged, model.module)
                state.best_state = {k: v.clone() for k, v in kept.state_dict().items()}
            threads = proc.cores.fewest_since_asked()
            log_epoch(row, batch_loss, seconds, threads, state, model, epoch > state.logged_epochs)
            save_checkpoint(state, model.module, run.info.run_id, checkpoint)
        if stopping and state.stopper.should_stop:
            if proc.logs:
                print(
                    f"early stopping: {state.stopper.monitor} has not improved for "
                    f"{state.stopper.patience} epochs; best epoch {state.stopper.best_epoch}",
                    flush=True,
                )
            break
        if search_trial is not None and search_trial.should_stop(epoch, row["val_accuracy"]):
            state.pruned = True
            print(f"pruned: trial {search_trial.number} stops after epoch {epoch}", flush=True)
            break


def run_epoch(
    params: P.Params, data: Data, model: Model, state: Training, epoch: int, shard=(0, 1)
) -> float:
    """Epoch `epoch` of training, its random draws replayable from (seed, epoch, rank): the
    augmentation and shuffle from epoch_generator, dropout and mixup from torch's global seed,
    which differs on each process. Returns the mean batch loss. EMA takes in the unwrapped
    model's weights after every step."""
    torch.manual_seed(params.seed * 1_000_003 + epoch + 7919 * shard[0])
    recipe = Recipe(
        state.optimizer,
        state.scheduler,
        state.loss_fn,
        params.train.batch_size,
        policy=state.policy,
        mixer=state.mixer,
        task_loss=state.task_loss,
        sam_rho=params.train.sam_rho,
        after_step=(
            partial(state.averaged.update_parameters, model.module)
            if params.train.ema_decay
            else None
        ),
    )
    return train_one_epoch(
        model.for_training,
        data.train_x,
        data.train_y,
        recipe,
        epoch_generator(params.seed, epoch),
        desc=f"epoch {epoch}/{params.train.epochs}",
        shard=shard,
    )


def log_epoch(
    row: dict,
    batch_loss: float,
    seconds: float,
    threads: int,
    state: Training,
    model: Model,
    log: bool = True,
) -> None:
    """Print the epoch's line; log its metrics unless the resumed MLflow run already has them
    (the same values: the rerun epoch is bit-identical). `threads`: the fewest it trained with."""
    if log:
        log_metrics_of_epoch(row, batch_loss, seconds, threads, state, model)
    print(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
        f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  {seconds:.1f}s"
        f"  {threads} thread{'s' if threads > 1 else ''}",
        flush=True,
    )


def log_metrics_of_epoch(
    row: dict, batch_loss: float, seconds: float, threads: int, state: Training, model: Model
) -> None:
    runs.log_metrics(
        {
            **row,
            "train_batch_loss": batch_loss,
            "epoch_seconds": seconds,
            "torch_threads": threads,  # fewer than the cores: the epoch shared them
            "gap": row["train_accuracy"] - row["val_accuracy"],
            "lr": state.optimizer.param_groups[-1]["lr"],  # the head's
            "trainable_parameters": trainable_parameters(model.module),
            **{
                f"task_weight_{t}": w
                for t, w in tasks.current_weights(model.module, model.task_weights).items()
            },
        },
        step=row["epoch"],
    )


def write_outputs(params: P.Params, data: Data, model: Model, state: Training, run) -> None:
    """The saved model (the last epoch's, or the best one's with restore_best; with weight
    averaging, the average), its metrics and curves, to files and to the MLflow run."""
    net, history, stopper = model.module, state.history, state.stopper
    saved = history[-1]
    if state.best_state is not None:
        net.load_state_dict(state.best_state)
        saved = history[stopper.best_epoch - 1]
    elif state.averaged is not None:
        net.load_state_dict(averaging.measured(state.averaged, net).state_dict())
    summary = {
        **{k: v for k, v in saved.items() if k != "epoch"},
        "epochs_run": len(history),
        "best_epoch": stopper.best_epoch,
        "num_parameters": predict.count_parameters(net),
        "trainable_parameters": trainable_parameters(net),
        **({} if state.pruned is None else {"pruned": int(state.pruned)}),  # a search's trial
    }
    net.cpu()  # saved and logged as a CPU model
    sio.save_torch(
        MODEL,
        {
            "state_dict": net.state_dict(),
            "params": P.result_params(params),  # not where it was logged (P.NOT_RESULT_KEYS)
            "classes": data.classes,
            "epoch": saved["epoch"],
        },
    )
    sio.write_json(METRICS, summary)
    sio.write_text(CURVES, curves_csv(history))
    save_curves_png(history)
    sio.write_json(RUN, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})

    runs.log_metrics({f"final_{k}": v for k, v in summary.items()})
    if state.pruned is not None:
        runs.set_tags({"optuna.pruned": str(state.pruned).lower()})
    for path in [P.PARAMS_FILE, METRICS, CURVES, CURVES_PNG]:
        runs.log_artifact(path)
    runs.log_model(net.eval(), to_float(data.val_x[:2].cpu()), MODEL)


def launch_under_torchrun(nproc: int) -> None:
    """train.nproc > 1 outside torchrun: become `torchrun --nproc-per-node nproc -m stages.train`."""
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        sys.stdout.flush()
        os.execv(
            torchrun, [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "stages.train"]
        )


def start_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): (0, 1) for one process; under torchrun, join its process group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise StageError(
                f"{os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine, "
                f"but {torch.cuda.device_count()} GPUs: one each is needed"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)  # also when a stage error ends the process
    return dist.get_rank(), world


def measure(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prefix: str,
    coarse: torch.Tensor | None,
    shard: tuple[int, int],
) -> dict[str, float]:
    """predict.measure on the whole split; with several processes, each measures every
    world-th image and the sums are added up, so every process gets the whole split's numbers."""
    rank, world = shard
    if world == 1:
        return predict.measure(model, images, labels, prefix, coarse)
    part = predict.measure(model, images[rank::world], labels[rank::world], prefix, coarse)
    count = len(labels[rank::world])
    sums = torch.tensor([v * count for v in part.values()] + [count], dtype=torch.float64)
    dist.all_reduce(sums)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(part)}


def checkpoint_path(
    params: P.Params, weights_sha256: str, world: int, *tensors: torch.Tensor
) -> Path:
    """<repository root>/data/checkpoints/<hash of the params, pretrained weights, process count
    (it changes the order of the sums, so a resumed run is bit-identical only with the same),
    MLflow store (a resumed run reopens its MLflow run, which only that store has) and data>.pt"""
    digest = hashlib.sha256()
    training_params = {k: v for k, v in P.flatten(params).items() if not k.startswith("mlflow.")}
    digest.update(json.dumps(training_params, sort_keys=True).encode())
    where = f"{store.tracking_uri(params.mlflow)}#{params.mlflow.experiment}"
    digest.update(f"{weights_sha256}/{world}/{where}".encode())
    for tensor in tensors:
        digest.update(tensor.numpy().tobytes())
    return repo_root() / CHECKPOINTS / f"{digest.hexdigest()[:20]}.pt"


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(
    train: P.Train,
    model: nn.Module,
    head: nn.Module | None = None,
    blocks: list[list[nn.Module]] | None = None,
) -> torch.optim.Optimizer:
    """The head at train.lr, the rest at train.lr * train.backbone_lr_mult (discriminative
    learning rates); without a head, one group. With train.layer_lr_decay < 1, block k counted
    from the head (the head is k = 0, the last of `blocks` k = 1) trains at lr * decay^k, a group
    per block; parameters in no block take the deepest block's rate. Frozen parameters are in the
    groups too but get no gradient, and optimizers skip those: no update, no weight decay, until unfrozen.
    Learned task weights (tasks.weighting = uncertainty) get a group of their own, at train.lr
    and without weight decay, which would pull every task's weight towards 1. With
    train.decay_bias_and_norm false, each group's 1-D parameters (biases, norm layers' scales
    and shifts) go to a twin group without weight decay, as timm's param_groups_weight_decay:
    decaying them limits no complexity and can hurt (a norm scale pulled to 0 shuts a channel)."""
    log_vars = getattr(model, "log_vars", None)
    skip = {id(log_vars)}
    in_head = {id(p) for p in (head or model).parameters()}
    blocks = blocks or []
    # one of the two factors is 1: params.py refuses setting both
    backbone_lr, decay = train.lr * train.backbone_lr_mult, train.layer_lr_decay
    deepest = backbone_lr * decay ** len(blocks)
    rate = {
        id(p): backbone_lr * decay ** (len(blocks) - i)
        for i, block in enumerate(blocks)
        for module in block
        for p in module.parameters()
    }
    by_rate: dict[float, list[nn.Parameter]] = {}  # one group per rate
    for p in model.parameters():
        if id(p) not in in_head | skip:
            by_rate.setdefault(rate.get(id(p), deepest), []).append(p)
    groups = [
        {"params": [log_vars] if log_vars is not None else [], "lr": train.lr, "weight_decay": 0.0},
        *({"params": params, "lr": lr} for lr, params in by_rate.items()),
        {"params": [p for p in model.parameters() if id(p) in in_head - skip], "lr": train.lr},
    ]
    if not train.decay_bias_and_norm:
        groups = [
            twin
            for g in groups
            for twin in (
                {**g, "params": [p for p in g["params"] if p.ndim <= 1], "weight_decay": 0.0},
                {**g, "params": [p for p in g["params"] if p.ndim > 1]},
            )
        ]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)


def make_scheduler(train: P.Train, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A per-step learning-rate schedule; `none` without warm-up keeps the lr constant."""
    total = train.epochs * steps_per_epoch
    if train.schedule == "onecycle":  # its own warm-up (30% of the steps) and annealing
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total
        )
    warmup = train.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if train.schedule == "step":
            return train.step_gamma ** (step // steps_per_epoch // train.step_epochs)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_loss(
    train: P.Train,
    model: nn.Module,
    class_weights: torch.Tensor | None,
    net: nn.Module | None = None,
    start_values: dict | None = None,
):
    """Cross-entropy (class weights, label smoothing; targets may be mixed probabilities) plus
    the explicit L1 and L2 penalties on the weights, and L2-SP towards `start_values` (the
    pretrained values of `net`'s parameters, by name)."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(
            logits, targets, weight=class_weights, label_smoothing=train.label_smoothing
        )
        if train.l1:
            loss = loss + train.l1 * regularize.l1_penalty(model)
        if train.l2:
            loss = loss + train.l2 * regularize.l2_penalty(model)
        if train.l2_sp:
            loss = loss + train.l2_sp * regularize.l2_sp_penalty(net, start_values)
        return loss

    return loss_fn


@dataclass
class Recipe:
    """How train_one_epoch makes its steps: all it needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # steps after every optimizer step
    loss_fn: Callable  # (logits, targets) -> the loss
    batch_size: int  # the global batch: with several processes, each takes its share
    policy: Policy = field(default_factory=Policy)  # online augmentation; Policy() is none
    mixer: Callable | None = None  # mixup / cutmix: (x, y) -> (mixed x, class probabilities)
    task_loss: tasks.TaskLoss | None = None  # auxiliary tasks: loss_fn combined with theirs
    sam_rho: float = 0.0  # > 0: each step is sharpness-aware (stages/sam.py)
    after_step: Callable[[], None] | None = None  # after every optimizer step (the EMA update)


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    desc: str = "",
    shard: tuple[int, int] = (0, 1),
) -> float:
    """One pass over the (augmented, shuffled) training set, steps made as `recipe` says;
    returns the mean batch loss. With shard = (rank, world), this process takes every world-th
    image of each batch.

    The images stay where they are (CPU or GPU); on a GPU the forward pass runs in bf16 autocast
    on channels-last batches. Batch losses stay on the device until the end of the epoch, so
    the loop never waits for the GPU."""
    model.train()
    if recipe.policy.active:
        images = augment(images, recipe.policy, generator)
    order = torch.randperm(len(images), generator=generator).to(images.device)
    cuda = images.device.type == "cuda"
    losses = []
    (rank, world), batch_size = shard, recipe.batch_size
    stop = len(images)
    if 0 < stop % batch_size < world:  # a last batch too small to give every process an image
        stop -= stop % batch_size
    bar = tqdm(range(0, stop, batch_size), desc=desc, leave=False, disable=not sys.stderr.isatty())
    for start in bar:
        keep_fair()  # fewer threads while others compute on this machine, all of them again after
        idx = order[start : start + batch_size][rank::world]
        x, y = to_float(images[idx]), labels[idx]
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        clean = x
        if recipe.mixer is not None:
            x, y = recipe.mixer(x, y)  # y becomes class probabilities
        draws = generator.get_state() if recipe.task_loss is not None else None

        def forward(x=x, y=y, clean=clean, draws=draws) -> torch.Tensor:
            if draws is not None:  # SAM's second pass: the same rotations as the first
                generator.set_state(draws)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                if recipe.task_loss is None:
                    return recipe.loss_fn(model(x), y)
                return recipe.task_loss(model, x, clean, y, recipe.loss_fn, generator)

        recipe.optimizer.zero_grad(set_to_none=True)
        if recipe.sam_rho:
            loss = sam.sam_backward(model, forward, recipe.sam_rho)
        else:
            loss = forward()
            loss.backward()
        recipe.optimizer.step()
        recipe.scheduler.step()
        if recipe.after_step is not None:
            recipe.after_step()
        losses.append(loss.detach().float() * len(idx))
    losses = torch.stack(losses).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise StageError(
            f"the training loss became {losses[bad[0, 0]].item()} at step "
            f"{bad[0, 0].item() + 1} of {desc or 'the epoch'}: lower train.lr or the penalties"
        )
    total = losses.sum().double()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / stop


class EarlyStopping:
    """Tracks the best epoch by `monitor`; `should_stop` after `patience` epochs without a
    change better than `min_delta`."""

    def __init__(self, monitor: str, patience: int, min_delta: float):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.sign = 1.0 if monitor == "val_loss" else -1.0  # lower loss, higher accuracy is better
        self.best = math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record one epoch's value; True when it is the new best."""
        score = self.sign * value
        if score < self.best - self.min_delta:
            self.best, self.best_epoch, self.epochs_without_improvement = score, epoch, 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.patience


def curves_csv(history: list[dict]) -> str:
    """The main task's columns first (CURVE_COLUMNS), then the auxiliary tasks' ones."""
    columns = CURVE_COLUMNS + [c for c in history[0] if c not in CURVE_COLUMNS]
    lines = [",".join(columns)]
    lines += [",".join(repr(row[c]) for c in columns) for row in history]
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
