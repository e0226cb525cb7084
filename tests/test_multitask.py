"""Multi-task training (stages/networks/tasks.py): auxiliary heads on one backbone, and what they log."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, TINY, write_params
from mlflow.tracking import MlflowClient
from PIL import Image

from stages import augment, download, evaluate, params as P, train
from stages.errors import ParamsError, StageError
from stages.experiments import compare
from stages.networks import predict, tasks, weights as pretrained_weights
from stages.networks.build import build_model

GROUPS = {"pets": ["cat", "dog"], "boats": ["ship"]}  # the tiny data's classes: cat, dog, ship
BOTH = {"tasks.coarse.weight": 0.5, "tasks.coarse.groups": GROUPS, "tasks.rotation.weight": 0.5}


def multitask_net(weighting="fixed", **weights) -> tasks.MultiTask:
    raw = P.with_changes(
        {},
        {
            "tasks.coarse.groups": GROUPS,
            "tasks.weighting": weighting,
            **{f"tasks.{t}.weight": w for t, w in weights.items()},
        },
    )
    torch.manual_seed(0)
    return build_model(P.parse(raw), num_classes=3, image_size=32)


def test_each_head_gets_gradients_only_from_its_own_loss():
    model = multitask_net(coarse=1.0, rotation=1.0)
    x = torch.rand(8, 3, 32, 32)
    out = model(x, tasks.rotate(x, torch.arange(8) % 4), tasks=True)
    heads = {
        "main": model.model.fc3,
        "coarse": model.heads["coarse"],
        "rotation": model.heads["rotation"],
    }
    losses = {
        "main": F.cross_entropy(out["main"], torch.randint(3, (8,))),
        "coarse": F.cross_entropy(out["coarse"], torch.randint(2, (8,))),
        "rotation": F.cross_entropy(out["rotation"], torch.arange(8) % 4),
    }
    for task, loss in losses.items():
        for head_task, head in heads.items():
            grads = torch.autograd.grad(
                loss, list(head.parameters()), retain_graph=True, allow_unused=True
            )
            got = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert got == (task == head_task), (task, head_task)
        # ... while every task's loss reaches the shared backbone
        assert (
            torch.autograd.grad(loss, model.model.conv1.weight, retain_graph=True)[0].abs().sum()
            > 0
        )


def test_rotate_turns_like_pillow():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    turned = tasks.rotate(images, torch.tensor([0, 1, 2, 3]))
    for k, pil_turn in enumerate(
        [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]
    ):  # counter-clockwise, like Pillow's
        img = Image.fromarray(images[k].permute(1, 2, 0).numpy())
        expected = np.asarray(img if pil_turn is None else img.transpose(pil_turn))
        assert np.array_equal(turned[k].permute(1, 2, 0).numpy(), expected), k
    assert tasks.evaluation_turns(6).tolist() == [0, 1, 2, 3, 0, 1]


def test_rotation_labels_match_the_images_they_were_drawn_for():
    """Trained with TaskLoss's own draws, the rotation head learns to read the turn of images
    whose orientation is visible: labels that didn't match the images would leave it at chance."""
    model = multitask_net(rotation=1.0)
    ramp = (
        torch.linspace(0, 255, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32)
    )  # dark left, bright right
    images = (ramp * torch.rand(64, 1, 1, 1) * 0.5 + 60).to(torch.uint8)
    labels = torch.randint(3, (64,))
    loss = tasks.TaskLoss({"rotation": 1.0}, None, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = images.float() / 255
        total = loss(model, x, x, labels, F.cross_entropy, g)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    measured = predict.measure(model, images, labels, "train")
    assert measured["train_rotation_accuracy"] > 0.95


def test_coarse_groups_are_validated():
    assert tasks.coarse_mapping(GROUPS, CLASSES).tolist() == [0, 0, 1]
    with pytest.raises(StageError, match=r"doesn't have: \['horse'\]"):
        tasks.coarse_mapping({**GROUPS, "animals": ["horse"]}, CLASSES)
    with pytest.raises(StageError, match=r"leaves classes out: \['ship'\]"):
        tasks.coarse_mapping({"pets": ["cat"], "more": ["dog"]}, CLASSES)
    with pytest.raises(ParamsError, match="'cat' is in groups 'pets' and 'boats'"):
        P.parse(
            P.with_changes({}, {"tasks.coarse.groups": {"pets": ["cat"], "boats": ["ship", "cat"]}})
        )
    with pytest.raises(ParamsError, match="at least two groups"):
        P.parse(P.with_changes({}, {"tasks.coarse.groups": {"all": CLASSES}}))
    with pytest.raises(ParamsError, match="group 'boats' is empty"):
        P.parse(P.with_changes({}, {"tasks.coarse.groups": {"pets": CLASSES, "boats": []}}))
    with pytest.raises(ParamsError, match="unknown key 'tasks.jigsaw'"):
        P.parse(P.with_changes({}, {"tasks.jigsaw.weight": 1.0}))


def test_coarse_targets_of_mixed_labels_are_group_probabilities():
    mapping = tasks.coarse_mapping(GROUPS, CLASSES)
    mixed = torch.tensor([[0.3, 0.5, 0.2], [0.0, 0.0, 1.0]])
    assert torch.allclose(
        tasks.coarse_targets(mixed, mapping), torch.tensor([[0.8, 0.2], [0.0, 1.0]])
    )
    assert tasks.coarse_targets(torch.tensor([2, 1, 0]), mapping).tolist() == [1, 0, 0]


def test_fixed_and_uncertainty_weighting():
    losses = {"main": torch.tensor(2.0), "coarse": torch.tensor(1.5), "rotation": torch.tensor(3.0)}
    weights = {"coarse": 0.5, "rotation": 0.1}
    assert tasks.combine(losses, weights, None).item() == pytest.approx(2.0 + 0.75 + 0.3)
    # Kendall et al.: exp(-s) L + s / 2, s starting at -log(weight): the same weights at first
    model = multitask_net("uncertainty", coarse=0.5, rotation=0.1)
    s = model.log_vars
    assert tasks.current_weights(model, weights) == pytest.approx(weights)
    total = tasks.combine(losses, weights, s)
    expected = sum(math.exp(-v) * loss + v / 2 for v, loss in zip(s.tolist(), [2.0, 1.5, 3.0]))
    assert total.item() == pytest.approx(expected)
    (grad,) = torch.autograd.grad(total, s)
    assert (grad != 0).all()  # learned
    # the optimizer keeps weight decay off them
    optimizer = train.make_optimizer(P.Train(weight_decay=0.1), model)
    group = next(g for g in optimizer.param_groups if any(p is s for p in g["params"]))
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 1


def test_a_zero_weight_switches_a_task_off_exactly(workdir, pickle_archive):
    download.main()
    augment.main()
    results = []
    for tasks_params in (
        {},
        {
            "tasks.coarse.weight": 0.0,
            "tasks.coarse.groups": GROUPS,
            "tasks.rotation.weight": 0.0,
            "tasks.weighting": "uncertainty",
        },
    ):
        write_params(workdir, **{**TINY, "data.source": str(pickle_archive), **tasks_params})
        train.main()
        evaluate.main()
        results.append(
            (
                torch.load("models/model.pt", weights_only=True)["state_dict"],
                (workdir / "metrics/train.json").read_text(),
                (workdir / "metrics/eval.json").read_text(),
            )
        )
    (state_a, *files_a), (state_b, *files_b) = results
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert files_a == files_b


def test_multitask_run_logs_every_task(workdir, pickle_archive, monkeypatch):
    write_params(
        workdir,
        **{**TINY, "data.source": str(pickle_archive), **BOTH, "tasks.weighting": "uncertainty"},
    )
    download.main()
    augment.main()
    monkeypatch.setenv("DVC_EXP_NAME", "both-tasks")
    train.main()
    evaluate.main()

    trained = json.loads((workdir / "metrics/train.json").read_text())
    evaluated = json.loads((workdir / "metrics/eval.json").read_text())
    for split, metrics in [("train", trained), ("val", trained), ("test", evaluated)]:
        for name in (
            f"{split}_accuracy",
            f"{split}_coarse_accuracy",
            f"{split}_rotation_accuracy",
            f"{split}_loss",
            f"{split}_coarse_loss",
            f"{split}_rotation_loss",
        ):
            assert 0 <= metrics[name] < 10, name
    header = (workdir / "reports/train_curves.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == train.CURVE_COLUMNS and "val_rotation_accuracy" in header

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(json.loads((workdir / "models/run.json").read_text())["run_id"])
    assert run.data.params["tasks.rotation.weight"] == "0.5"
    assert run.data.metrics["test_coarse_accuracy"] == evaluated["test_coarse_accuracy"]
    history = client.get_metric_history(run.info.run_id, "val_rotation_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    weights = client.get_metric_history(run.info.run_id, "task_weight_coarse")
    assert weights[-1].value != 0.5  # learned (uncertainty weighting)

    # The saved model holds every head; the logged one predicts the main task as before.
    state = torch.load("models/model.pt", weights_only=True)["state_dict"]
    assert {"heads.coarse.weight", "heads.rotation.weight", "log_vars"} <= state.keys()
    import mlflow.pytorch

    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert logged(torch.rand(2, 3, 32, 32)).shape == (2, len(CLASSES))

    # Its backbone fine-tunes a single-task model: the weights file reads without the heads.
    backbone = pretrained_weights.read_state_dict(workdir / "models/model.pt", "net")
    assert "fc3.weight" in backbone and not any(
        k.startswith(("heads.", "model.")) for k in backbone
    )

    monkeypatch.setattr(sys, "argv", ["compare"])
    compare.main()
    report = (workdir / "reports/comparison.md").read_text()
    assert "| coarse acc | rotation acc |" in report
