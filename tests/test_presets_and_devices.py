"""The GPU path's switches as far as a CPU can check them, and the fast GPU preset on tiny data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import TINY, write_params

from stages import augment, download, evaluate, params as P, train
from stages.data import Policy, augment as augment_images, epoch_generator
from stages.errors import ParamsError, StageError
from stages.experiments import preset
from stages.networks import predict, small


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(StageError, match="train.device = cuda, but PyTorch sees no CUDA GPU"):
        train.resolve_device("cuda")
    assert train.resolve_device("auto") == torch.device("cpu")


def test_augmentation_draws_do_not_depend_on_the_device():
    """The random draws come from a CPU generator; only the pixels live on the device. With the
    images on the 'meta' device (shapes, no data) every op must still accept the draws."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    policy = Policy(flip=True, crop_padding=4, color_jitter=0.3, erasing=0.5)
    out = augment_images(images.to("meta"), policy, epoch_generator(0, 1))
    assert out.device.type == "meta" and out.shape == images.shape


def test_the_fast_gpu_preset_is_valid_and_becomes_one_dvc_experiment():
    changes = preset.load("fast-gpu")
    params = P.parse(P.with_changes(yaml.safe_load(P.PARAMS_FILE.read_text()), changes))
    assert params.model.name == "resnet9" and params.train.schedule == "onecycle"
    cmd = preset.command("fast-gpu", changes, queue=True, extra=["seed=1"])
    assert cmd[:6] == ["dvc", "exp", "run", "-n", "fast-gpu", "--queue"]
    assert cmd[-2:] == ["-S", "seed=1"] and "data.train_size=null" in cmd
    with pytest.raises(ParamsError, match="no preset 'fastest'"):
        preset.load("fastest")


def test_the_fast_gpu_preset_runs_on_a_cpu(workdir, pickle_archive):
    """The preset as it is, but on the tiny data set and for 2 epochs of small batches."""
    changes = {
        **preset.load("fast-gpu"),
        **TINY,
        "data.source": str(pickle_archive),
        "train.batch_size": 16,
        "train.lr": 0.05,
    }
    write_params(workdir, **changes)
    download.main()
    augment.main()
    train.main()
    evaluate.main()
    trained = json.loads(train.METRICS.read_text())
    assert trained["epochs_run"] == 2
    assert trained["num_parameters"] == predict.count_parameters(small.ResNet9(3))
    assert 0 <= json.loads(evaluate.METRICS.read_text())["test_accuracy"] <= 1


@pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile needs a C++ compiler on a CPU"
)
def test_compile_trains_and_saves_the_plain_model(workdir, pickle_archive):
    write_params(
        workdir,
        **{**TINY, "data.source": str(pickle_archive), "train.compile": True, "train.epochs": 1},
    )
    download.main()
    augment.main()
    train.main()
    saved = torch.load(train.MODEL, weights_only=True)["state_dict"]
    assert set(saved) == set(small.Net(3).state_dict())  # no _orig_mod. prefix: the plain model
