"""Weight averaging (train.ema_decay, train.swa_start_epoch), sharpness-aware minimization
(train.sam_rho) and weight decay without biases and norm layers (train.decay_bias_and_norm).
Each test fails if its feature were a no-op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import TINY, run_stage, write_params

from stages import augment, averaging, download, params as P, sam, train
from stages.data import epoch_generator, to_float
from stages.errors import ParamsError
from stages.networks.build import build_model


def saved_state(workdir) -> dict[str, torch.Tensor]:
    return torch.load(workdir / "models/model.pt", weights_only=True)["state_dict"]


def distance(a: dict, b: dict) -> float:
    """L2 distance between two state dicts' floating-point tensors."""
    return (
        sum(
            (a[k].float() - b[k].float()).pow(2).sum().item() for k in a if a[k].is_floating_point()
        )
        ** 0.5
    )


@pytest.fixture
def tiny(workdir, pickle_archive):
    """Tiny data, downloaded and prepared; params are written by each test."""
    params = {**TINY, "data.source": str(pickle_archive), "train.epochs": 3, "train.batch_size": 16}
    write_params(workdir, **params)
    download.main()
    augment.main()
    return params


def train_with(workdir, base: dict, **changes) -> dict[str, torch.Tensor]:
    write_params(workdir, **base, **changes)
    train.main()
    return saved_state(workdir)


# --- weight averaging ---


def test_the_saved_model_is_the_ema_and_near_the_start_with_decay_near_1(workdir, tiny):
    raw = train_with(workdir, tiny)
    ema = train_with(workdir, tiny, **{"train.ema_decay": 0.9999})
    torch.manual_seed(0)  # as train.main: the initialization of seed 0
    classes = torch.load(workdir / "models/model.pt", weights_only=True)["classes"]
    start = build_model(P.load(), len(classes), image_size=32).state_dict()
    # The raw run moved far from the start; the average, which takes in 1e-4 of the weights per
    # step after copying those of the first step, stayed close to it.
    assert distance(ema, raw) > 0.5 * distance(raw, start)
    assert distance(ema, start) < 0.1 * distance(raw, start)


def test_swa_saves_the_mean_of_the_last_epochs(workdir, tiny):
    raw = train_with(workdir, tiny)
    # averaging only the last epoch's weights is the raw model, buffers and all
    last = train_with(workdir, tiny, **{"train.swa_start_epoch": 3})
    assert all(torch.equal(last[k], raw[k]) for k in raw)
    two = train_with(workdir, tiny, **{"train.swa_start_epoch": 2})
    assert distance(two, raw) > 1e-3


def test_batch_norm_statistics_are_averaged_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    averaged = averaging.averaged_model(net, 0.9, 0)
    running = []
    for _ in range(2):
        net(torch.randn(8, 3, 6, 6) * 3 + 1)  # a train-mode forward moves the running statistics
        averaged.update_parameters(net)
        running.append(net[1].running_mean.clone())
    # the first update copies, the second blends: 0.9 * first + 0.1 * second
    expected = 0.9 * running[0] + 0.1 * running[1]
    assert torch.allclose(averaged.module[1].running_mean, expected)
    assert not torch.allclose(averaged.module[1].running_mean, running[1])
    assert averaging.measured(averaged, net) is averaged.module


class Interrupted(Exception):
    pass


def test_a_resumed_run_with_ema_ends_like_an_uninterrupted_one(workdir, tiny, monkeypatch, capsys):
    ema = {**tiny, "train.epochs": 4, "train.ema_decay": 0.9}
    whole = train_with(workdir, ema)

    log_epoch = train.log_epoch

    def stop_at_epoch_3(row, *args):
        if row["epoch"] == 3:  # after epoch 2's checkpoint, before epoch 3's
            raise Interrupted
        log_epoch(row, *args)

    monkeypatch.setattr(train, "log_epoch", stop_at_epoch_3)
    write_params(workdir, **ema)
    with pytest.raises(Interrupted):
        train.main()
    monkeypatch.setattr(train, "log_epoch", log_epoch)
    resumed = train_with(workdir, ema)
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


# --- sharpness-aware minimization ---


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_one_sam_step_is_the_hand_computed_one(optimizer):
    rho = 0.5
    settings = P.Train(optimizer=optimizer, lr=0.1, weight_decay=0.01, l2=0.01, sam_rho=rho)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(3, (8,), generator=g)

    model = tiny_model()
    by_hand = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    for net, sam_rho in ((model, rho), (plain, 0.0)):
        optimizer_ = train.make_optimizer(settings, net)
        recipe = train.Recipe(
            optimizer_,
            torch.optim.lr_scheduler.LambdaLR(optimizer_, lambda step: 1.0),
            train.make_loss(settings, net, None),
            batch_size=8,  # one batch: one step
            sam_rho=sam_rho,
        )
        train.train_one_epoch(net, images, labels, recipe, epoch_generator(0, 1))

    # SAM by hand: the gradient at w, the ascent to w + rho g / ||g||, the gradient there
    # (penalty included), the optimizer's step from w with that gradient.
    loss_fn = train.make_loss(settings, by_hand, None)
    x = to_float(images)
    weights = list(by_hand.parameters())
    grads = torch.autograd.grad(loss_fn(by_hand(x), labels), weights)
    norm = torch.sqrt(sum(gr.pow(2).sum() for gr in grads))
    start = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w, gr in zip(weights, grads, strict=True):
            w.add_(rho * gr / norm)
    second = torch.autograd.grad(loss_fn(by_hand(x), labels), weights)
    with torch.no_grad():
        for w, w0, gr in zip(weights, start, second, strict=True):
            w.copy_(w0)
            w.grad = gr
    train.make_optimizer(settings, by_hand).step()

    for ours, theirs, plain_ in zip(model.parameters(), weights, plain.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert not torch.allclose(ours, plain_, atol=1e-4)  # and not a plain step


def test_sam_updates_batch_norm_statistics_once_per_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    plain = copy.deepcopy(net)
    x, y = torch.randn(8, 3, 6, 6) * 2 + 1, torch.randint(2, (8,))
    sam.sam_backward(net, lambda: nn.functional.cross_entropy(net(x), y), rho=0.5)
    nn.functional.cross_entropy(plain(x), y).backward()  # one pass at the same weights
    assert torch.allclose(net[1].running_mean, plain[1].running_mean)
    assert torch.allclose(net[1].running_var, plain[1].running_var)
    assert net[1].num_batches_tracked.item() == 1
    assert net[1].momentum == plain[1].momentum  # put back
    # the weights are back where they were, exactly, and the gradient is the ascended one
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), plain.parameters()))
    assert not torch.allclose(net[3].weight.grad, plain[3].weight.grad)


def test_sam_trains_with_two_processes(workdir, tiny):
    changes = {"train.nproc": 2, "train.epochs": 1, "train.sam_rho": 0.05, "train.ema_decay": 0.9}
    write_params(workdir, **{**tiny, **changes})
    result = run_stage("train", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert saved_state(workdir)  # rank 0 wrote the model


# --- weight decay without biases and norm layers ---


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_without_decay_on_biases_and_norms_only_the_weights_shrink(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    head = model[2]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    settings = P.Train(
        optimizer=optimizer,
        lr=0.1,
        weight_decay=0.1,
        decay_bias_and_norm=False,
        backbone_lr_mult=0.5,
    )
    opt = train.make_optimizer(settings, model, head)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the decay moves anything
    opt.step()
    after = dict(model.named_parameters())
    for name in ("0.bias", "1.weight", "1.bias", "2.bias"):
        assert torch.equal(after[name], before[name]), name
    for name in ("0.weight", "2.weight"):
        assert after[name].abs().sum() < before[name].abs().sum(), name
    # the groups keep their learning rates: the head at lr, the rest at lr * backbone_lr_mult
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model[0].bias)] == lr_of[id(model[0].weight)] == 0.05
    assert lr_of[id(head.bias)] == lr_of[id(head.weight)] == 0.1


def test_by_default_weight_decay_touches_biases_too():
    model = nn.Linear(3, 2)
    before = model.bias.detach().clone()
    opt = train.make_optimizer(P.Train(lr=0.1, weight_decay=0.1), model)
    model.weight.grad, model.bias.grad = (
        torch.zeros_like(model.weight),
        torch.zeros_like(model.bias),
    )
    opt.step()
    assert not torch.equal(model.bias, before)


# --- refusals ---


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ema_decay": 1.0}, "train.ema_decay = 1.0: Input should be less than 1"),
        ({"ema_decay": -0.1}, "train.ema_decay = -0.1: Input should be greater than or equal to 0"),
        ({"sam_rho": -0.05}, "train.sam_rho = -0.05: Input should be greater than or equal to 0"),
        ({"swa_start_epoch": 11}, "train.swa_start_epoch = 11, but training stops"),
        ({"ema_decay": 0.99, "swa_start_epoch": 5}, "train.ema_decay and train.swa_start_epoch"),
        ({"decay_bias_and_norm": False}, "train.decay_bias_and_norm = false .*weight_decay is 0"),
    ],
)
def test_settings_that_make_no_sense_are_refused(changes, message):
    raw = P.read_yaml()
    raw["train"].update(changes)  # the repository's params: 10 epochs, no weight decay
    with pytest.raises(ParamsError, match="^params.yaml: " + message):
        P.parse(raw)
