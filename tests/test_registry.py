"""Networks as one registry: a new network is one entry; timm's model zoo is a family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import REPO, TINY, write_params

from stages import evaluate, io as sio, params as P, train
from stages.errors import ParamsError
from stages.networks import feature_cache, registry
from stages.networks.build import Normalized, build_model


class Toy(nn.Module):
    """A network none of the pipeline's modules knows: two conv blocks with batch norm, a head."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16)
        self.pool, self.out = nn.AdaptiveAvgPool2d(1), nn.Linear(16, num_classes)

    def layers(self) -> list[nn.Module]:
        return [
            *(self.conv1, self.bn1, nn.ReLU(), self.conv2, self.bn2, nn.ReLU()),
            *(self.pool, nn.Flatten(), self.out),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential(*self.layers())(x)


TOY = registry.Network(
    build=lambda m, classes: Toy(classes),
    head="out",
    blocks=lambda net: [[net.conv1, net.bn1], [net.conv2, net.bn2]],
    layers=lambda net: net.layers(),
    input_sizes=lambda m: (8, 64, "it halves the image once"),
)


def cached_files(folder) -> int:
    return len(list((folder / feature_cache.CACHE).glob("*.pt")))


def test_a_new_network_is_one_registry_entry(prepared, monkeypatch):
    """The toy network, added as one entry and nowhere else: params accept its name and check
    its input sizes; the stages train it from a weights file with its first block frozen
    (through the feature cache: train, validation and test features computed once), and
    evaluate runs WiSE-FT on it."""
    monkeypatch.setitem(registry.NETWORKS, "toy", TOY)
    with pytest.raises(ParamsError, match="toy takes 8…64 pixels"):
        P.parse({"model": {"name": "toy", "input_size": 128}})
    torch.manual_seed(3)
    weights = prepared / "toy.pt"
    torch.save(Toy(7).state_dict(), weights)  # "pretrained" for 7 classes: the head is new
    write_params(
        prepared,
        **{
            **TINY,
            "data.source": "unused",
            "model.name": "toy",
            "model.pretrained": str(weights),
            "model.freeze": "all_but_last_1",
            "evaluate.wise_alphas": [0.0, 0.5],
        },
    )
    train.main()
    evaluate.main()
    assert cached_files(prepared) == 3  # train, val, test
    state = sio.load_torch(train.MODEL)["state_dict"]
    pretrained = torch.load(weights)
    for k in ("conv1.weight", "bn1.running_mean", "bn1.running_var"):  # frozen means frozen
        assert torch.equal(state[k], pretrained[k]), k
    assert not torch.equal(state["conv2.weight"], pretrained["conv2.weight"])
    metrics = json.loads(evaluate.METRICS.read_text())
    assert [row["alpha"] for row in metrics["wise_curve"].values()] == [0, 0.5, 1]


ARCH = "test_efficientnet"  # timm's own tiny test model: no download, seconds to train


@pytest.fixture
def timm_weights(prepared):
    """A state dict of the architecture, as a user's file of timm weights would be."""
    import timm

    torch.manual_seed(4)
    path = prepared / "timm-weights.pt"
    torch.save(timm.create_model(ARCH).state_dict(), path)
    return path


def test_timm_entry_comes_from_the_models_own_description():
    import timm

    entry = registry.network(f"timm/{ARCH}")
    cfg = timm.models.get_pretrained_cfg(ARCH)
    assert entry.head == cfg.classifier == "classifier"
    assert entry.mean_std == (tuple(cfg.mean), tuple(cfg.std))
    assert entry.input_sizes(None)[1] == cfg.input_size[-1]
    params = P.parse({"model": {"name": f"timm/{ARCH}", "input_size": 64}})
    model = build_model(params, num_classes=3, image_size=32)
    assert isinstance(model, Normalized) and model.size == 64
    assert model.net.get_classifier().out_features == 3
    blocks = entry.blocks(model.net)
    in_blocks = {id(p) for block in blocks for m in block for p in m.parameters()}
    head = {id(p) for p in model.net.get_classifier().parameters()}
    assert in_blocks | head == {id(p) for p in model.net.parameters()} and not in_blocks & head
    with pytest.raises(ParamsError, match="timm has no architecture 'no_such_net'"):
        P.parse({"model": {"name": "timm/no_such_net"}})


def test_timm_model_frozen_cached_and_unfrozen_offline(prepared, timm_weights, capsys):
    """timm/<architecture> with a local weights file, offline: a linear probe (frozen backbone,
    through the feature cache, WiSE-FT in evaluate), then full fine-tuning with layer-wise lr
    decay, L2-SP and frozen batch norm."""
    probe = {
        **TINY,
        "data.source": "unused",
        "model.name": f"timm/{ARCH}",
        "model.pretrained": str(timm_weights),
        "model.freeze": "backbone",
        "evaluate.wise_alphas": [0.0],
    }
    write_params(prepared, **probe)
    train.main()
    evaluate.main()
    assert "feature cache: not used" not in capsys.readouterr().out
    assert cached_files(prepared) == 3
    state = sio.load_torch(train.MODEL)["state_dict"]
    pretrained = torch.load(timm_weights)
    backbone = [k for k in pretrained if not k.startswith("classifier.")]
    assert all(torch.equal(state["net." + k], pretrained[k]) for k in backbone)
    assert "wise_alpha" in json.loads(evaluate.METRICS.read_text())

    write_params(
        prepared,
        **{
            **probe,
            "model.freeze": "none",
            "model.freeze_bn": True,
            "train.layer_lr_decay": 0.8,
            "train.l2_sp": 0.01,
        },
    )
    train.main()
    evaluate.main()
    state = sio.load_torch(train.MODEL)["state_dict"]
    assert not torch.equal(state["net.conv_stem.weight"], pretrained["conv_stem.weight"])
    assert 0 <= json.loads(evaluate.METRICS.read_text())["test_accuracy"] <= 1


def test_timm_imagenet_weights_offline_are_one_clear_error(tmp_path):
    """Offline (HF_HUB_OFFLINE, read when huggingface_hub is imported: a fresh interpreter),
    model.pretrained = imagenet for a timm model stops with one line that names the way out."""
    code = (
        "from stages.networks import timm_models\n"
        "try:\n    timm_models.imagenet_file('resnet18')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    ).stdout
    assert out.startswith("StageError could not get timm's pretrained weights of resnet18")
    assert "set model.pretrained to a state dict file" in out


@pytest.mark.parametrize("name", [n for n, e in registry.NETWORKS.items() if e.block_count])
def test_a_freeze_deeper_than_the_network_is_refused_by_the_check_stage(name):
    """Each entry's block count, known without building the network, is its blocks' when built;
    one block more than that is one line from the params check, before any stage has run."""
    entry = registry.network(name)
    depths = [2, 3, 5] if name == "cnn" else [None]
    for depth in depths:
        model = {"name": name, **({"depth": depth} if depth else {})}
        if entry.mean_std:  # an ImageNet network on 32-px data: resized inside the model
            model["input_size"] = 64
        m = P.parse({"model": model}).model
        count = entry.block_count(m)
        assert count == len(entry.blocks(entry.build(m, 10)))
        P.parse({"model": {**model, "freeze": f"all_but_last_{count}"}})  # every block: fine
        with pytest.raises(ParamsError) as err:
            P.parse({"model": {**model, "freeze": f"all_but_last_{count + 1}"}})
        assert str(err.value) == (
            f"params.yaml: model.freeze = all_but_last_{count + 1}: {name} has only {count} "
            f"blocks (all_but_last_{count} or none trains every one)"
        )


@pytest.mark.parametrize("variant", [0, 2])
def test_the_dropout_before_a_lites_head_is_a_param_and_refused_elsewhere(variant):
    """model.head_dropout changes the p of EfficientNet-Lite's dropout before its classifier and
    nothing else (null keeps the network's own); a network without that layer refuses it."""
    own = {0: 0.2, 2: 0.3}[variant]
    name = f"efficientnet_lite{variant}"
    m = P.parse({"model": {"name": name, "input_size": 64}}).model
    torch.manual_seed(0)
    default = registry.network(name).build(m, 10)
    torch.manual_seed(0)
    m = P.parse({"model": {"name": name, "input_size": 64, "head_dropout": 0.5}}).model
    changed = registry.network(name).build(m, 10)
    assert default._dropout.p == own and changed._dropout.p == 0.5
    assert all(
        torch.equal(a, b)
        for a, b in zip(default.state_dict().values(), changed.state_dict().values())
    )
    with pytest.raises(ParamsError) as err:
        P.parse({"model": {"name": "net", "head_dropout": 0.5}})
    assert str(err.value).startswith(
        "params.yaml: model.head_dropout = 0.5 applies to efficientnet_lite0"
    )
