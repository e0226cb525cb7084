"""train.feature_cache: the frozen prefix computed once per image, the same results as recomputing."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import TINY, repository_params, start_train, wait_for_checkpoint, write_params

from stages import augment, download, evaluate, io as sio, params as P, train
from stages.networks import feature_cache, freeze
from stages.networks.build import build_model, network


def params(**changes) -> P.Params:
    """The repository's params with dotted changes, e.g. {"model.name": "cnn"}."""
    return P.parse(repository_params(**changes))


LITE0 = {"model.name": "efficientnet_lite0", "model.input_size": 64, "model.freeze_bn": True}
CNN = {"model.name": "cnn", "model.batch_norm": True, "model.freeze_bn": True, "model.dropout": 0.5}


@pytest.mark.parametrize(
    "net, freeze_setting, cached_shape",
    [
        (LITE0, "backbone", (1280,)),  # pooled: the head's input
        (LITE0, "all_but_last_3", (192, 2, 2)),  # the input of MBConv block 15 at 64 pixels
        (CNN, "backbone", (128,)),
        (CNN, "all_but_last_1", (64, 8, 8)),
        ({"model.name": "net"}, "backbone", (84,)),  # fc2 and its ReLU
        ({"model.name": "net"}, "all_but_last_2", (400,)),  # pooled, flattened
        ({"model.name": "resnet9", "model.width": 0.25}, "backbone", (128,)),  # max-pooled
        ({"model.name": "resnet18"}, "all_but_last_1", (256, 2, 2)),
        ({"model.name": "mobilenet_v3_small"}, "backbone", (1024,)),  # its hardswish included
        ({"model.name": "efficientnet_b0"}, "backbone", (1280,)),
    ],
)
def test_prefix_then_suffix_is_the_model(net, freeze_setting, cached_shape):
    p = params(**net, **{"model.freeze": freeze_setting})
    torch.manual_seed(0)
    model = build_model(p, num_classes=10, image_size=32).eval()
    prefix, suffix = feature_cache.split(model, p.model.name, p.model.freeze)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        features = prefix(x)
        assert features.shape[1:] == cached_shape
        torch.testing.assert_close(suffix(features), model(x), rtol=0, atol=1e-6)
    frozen = {id(q) for q in freeze.frozen_parameters(network(model), p.model.name, freeze_setting)}
    assert {id(q) for q in prefix.parameters()} == frozen  # every frozen weight, nothing else
    assert not any(isinstance(m, torch.nn.Dropout) for m in prefix.modules())


def test_frozen_blocks_run_as_in_evaluation():
    """Frozen means frozen, without model.freeze_bn too: in training mode a frozen block keeps its
    batch-norm statistics and Lite0's stochastic depth is off; once train.unfreeze_at_epoch gives
    it gradients again, it trains as any block."""
    p = params(**{**LITE0, "model.freeze_bn": False, "model.freeze": "backbone"})
    torch.manual_seed(0)
    model = build_model(p, num_classes=10, image_size=32)
    prefix, _ = feature_cache.split(model, p.model.name, p.model.freeze)
    frozen = freeze.frozen_parameters(network(model), p.model.name, p.model.freeze)
    for q in frozen:
        q.requires_grad_(False)
    statistics = network(model)._blocks[3]._bn1.running_mean
    x = torch.rand(8, 3, 32, 32)
    model.train()
    with torch.no_grad():
        before = statistics.clone()
        assert not torch.equal(prefix(x), prefix(x))  # stochastic depth: random in training
        assert not torch.equal(statistics, before)  # and the statistics follow the batches
        freeze.hold_frozen_in_eval(network(model), p.model.name, p.model.freeze)
        model.train()
        before = statistics.clone()
        torch.testing.assert_close(prefix(x), prefix(x), rtol=0, atol=0)
        assert torch.equal(statistics, before)
        for q in frozen:  # train.unfreeze_at_epoch: the blocks train again
            q.requires_grad_(True)
        model.train()
        assert not torch.equal(prefix(x), prefix(x))
        assert not torch.equal(statistics, before)


@pytest.mark.parametrize(
    "changes, why",
    [
        (
            {"model.name": "net", "model.conv_dropout": 0.2, "model.freeze": "all_but_last_1"},
            "dropout between the frozen blocks",
        ),
        ({**CNN, "augment.online": True, "augment.flip": True}, "online augmentation"),
        ({**CNN, "augment.mixup_alpha": 0.2}, "mixup / cutmix"),
        ({**CNN, "tasks.rotation.weight": 0.5}, "auxiliary tasks"),
        ({**CNN, "model.freeze_bn": False}, None),  # frozen blocks: batch norm as in evaluation
        ({**LITE0, "model.freeze_bn": False}, None),
        ({**CNN, "model.freeze_bn": False, "model.batch_norm": False}, None),
    ],
)
def test_when_the_cache_cannot_apply_it_says_why(changes, why, capsys):
    p = params(**{"model.freeze": "backbone", **changes})
    torch.manual_seed(0)
    model = build_model(p, num_classes=10, image_size=32)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    cache = feature_cache.set_up(p, images, images, model)
    out = capsys.readouterr().out
    if why is None:
        assert cache is not None and out == ""
    else:
        assert cache is None
        assert out.startswith("feature cache: not used: ") and why in out
        assert out.count("\n") == 1


def test_the_key_follows_everything_that_shapes_the_features():
    p = params(**CNN, **{"model.freeze": "all_but_last_1"})
    torch.manual_seed(0)
    model = build_model(p, num_classes=10, image_size=32)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    def key(p=p, model=model, images=images):
        prefix, _ = feature_cache.split(model, p.model.name, p.model.freeze)
        return feature_cache.cache_key(prefix, images, p)

    first = key()
    with torch.no_grad():
        model.head[-1].weight.add_(1)  # the trainable part: not in the key
    assert key() == first
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    changed = [
        key(images=other),
        key(p=params(**CNN, **{"model.freeze": "backbone"})),
        key(p=params(**CNN, **{"model.freeze": "all_but_last_1", "model.input_size": 64})),
    ]
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] += 1e-3  # a frozen weight
    changed.append(key())
    assert len({first, *changed}) == 5


def test_a_corrupt_or_foreign_cache_file_is_recomputed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = params(**CNN, **{"model.freeze": "backbone"})
    torch.manual_seed(0)
    model = build_model(p, num_classes=10, image_size=32)
    prefix, _ = feature_cache.split(model, p.model.name, p.model.freeze)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    expected = feature_cache.features(prefix, images, p)
    (path,) = (tmp_path / feature_cache.CACHE).glob("*.pt")
    assert capsys.readouterr().out == ""

    path.write_bytes(b"not a torch file")
    torch.testing.assert_close(feature_cache.features(prefix, images, p), expected)
    assert "is unreadable" in capsys.readouterr().out
    sio.save_torch(path, {**sio.load_torch(path), "format": feature_cache.FORMAT - 1})
    torch.testing.assert_close(feature_cache.features(prefix, images, p), expected)
    assert "another format version" in capsys.readouterr().out
    assert sio.load_torch(path)["format"] == feature_cache.FORMAT  # rewritten


PROBE = {
    **TINY,
    "data.source": "unused",
    **CNN,
    "model.freeze": "all_but_last_1",
    "train.epochs": 3,
    "train.batch_size": 16,
}


@pytest.fixture
def tiny_data(workdir, pickle_archive):
    write_params(workdir, **{"data.source": str(pickle_archive), **TINY, "augment.copies": 1})
    download.main()
    augment.main()
    return workdir


@pytest.mark.parametrize("unfreeze_at_epoch", [0, 3])
def test_training_on_the_cache_gives_the_results_of_recomputing(
    tiny_data, capsys, unfreeze_at_epoch
):
    """cnn with batch norm, its last conv block and head trained (dropout 0.5 in the head: the
    same random draws in both), with offline copies: the same weights and metrics, the train,
    validation and test features each computed once. With train.unfreeze_at_epoch = 3 (LP-FT),
    epochs 1-2 train on the cache and epoch 3 runs the whole network; the test set is then
    measured by the whole network. Not bitwise: the cache computes the prefix in batches of
    1,000 and the recomputing run in training batches of 16, and a convolution's sums may be
    ordered differently for another batch size."""
    results = {}
    for cached in (False, True):
        write_params(
            tiny_data,
            **{
                **PROBE,
                "train.feature_cache": cached,
                "train.unfreeze_at_epoch": unfreeze_at_epoch,
            },
        )
        train.main()
        evaluate.main()
        results[cached] = (
            sio.load_torch(train.MODEL)["state_dict"],
            json.loads(train.METRICS.read_text()),
            json.loads(evaluate.METRICS.read_text()),
        )
    assert "feature cache" not in capsys.readouterr().out
    files = list((tiny_data / feature_cache.CACHE).glob("*.pt"))
    assert len(files) == (2 if unfreeze_at_epoch else 3)  # train (with its copies), val, test
    sizes = sorted(len(sio.load_torch(f)["features"]) for f in files)
    prepared_train = len(train.load_data(train.PREPARED).train_x)
    assert prepared_train in sizes
    (state, metrics, test), (state_c, metrics_c, test_c) = results[False], results[True]
    assert state.keys() == state_c.keys()
    for k in state:
        torch.testing.assert_close(state_c[k], state[k], rtol=1e-4, atol=1e-5)
    for a, b in ((metrics, metrics_c), (test, test_c)):
        for k in ("train_loss", "val_loss", "test_loss", "train_accuracy", "test_accuracy"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


def test_the_cache_survives_a_killed_run(tiny_data, capsys):
    """SIGKILL after the first epoch, then the rerun resumes: it reads the cache files the killed
    run wrote, without writing them again."""
    write_params(tiny_data, **{**PROBE, "train.epochs": 8})
    proc = start_train(tiny_data)
    wait_for_checkpoint(tiny_data, 1, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    files = sorted((tiny_data / feature_cache.CACHE).glob("*.pt"))
    assert len(files) == 2  # train and val
    written = [f.stat().st_mtime_ns for f in files]
    write_params(tiny_data, **{**PROBE, "train.epochs": 8})
    train.main()
    out = capsys.readouterr().out
    assert "resuming after epoch" in out and "feature cache" not in out
    assert [f.stat().st_mtime_ns for f in files] == written


def test_a_lite0_probe_on_the_cache_matches_recomputing(tmp_path, monkeypatch):
    """The real case, in process: a linear probe of Lite0's ImageNet weights (at 64 pixels, to
    be quick), model.freeze = backbone alone (no freeze_bn), two epochs of train.run_epoch on the
    cache and recomputing (whose frozen blocks then run as in evaluation: batch norm on its
    running statistics, no stochastic depth): the same head."""
    monkeypatch.chdir(tmp_path)
    p = params(
        **{**LITE0, "model.freeze_bn": False},
        **{"model.pretrained": "imagenet", "model.freeze": "backbone"},
    )
    p = p.model_copy(update={"train": p.train.model_copy(update={"batch_size": 8, "lr": 0.05})})
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (24,), generator=generator)
    data = train.Data(images, labels, images[:8], labels[:8], ["a", "b", "c"], None)
    heads = {}
    for cached in (False, True):
        torch.manual_seed(0)
        model = train.set_up_model(p, data)
        model.for_training = model.for_measuring = model.module
        state = train.set_up_training(p, data, model)
        if cached:
            model.cache = feature_cache.set_up(p, data.train_x, data.val_x, model.module)
        for epoch in (1, 2):
            for q in model.frozen:
                q.requires_grad_(False)
            seen, trained = feature_cache.for_epoch(model.cache, data, model, still_frozen=True)
            train.run_epoch(p, seen, trained, state, epoch)
        heads[cached] = {k: v.clone() for k, v in model.network._fc.state_dict().items()}
    assert len(list((tmp_path / feature_cache.CACHE).glob("*.pt"))) == 2  # train, val
    for k in heads[False]:
        torch.testing.assert_close(heads[True][k], heads[False][k], rtol=1e-4, atol=1e-5)
