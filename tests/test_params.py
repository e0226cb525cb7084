"""params.yaml is validated by one schema: clear one-line errors, numbers written as strings."""

from __future__ import annotations

import pytest

from conftest import REPO, run_stage, write_params
from stages import params as P
from stages.errors import ParamsError


def test_repository_params_are_valid():
    P.load(REPO / "params.yaml")


def test_unknown_key_names_the_key_and_what_is_allowed():
    with pytest.raises(ParamsError, match=r"unknown key 'train.lrr' \(allowed here: epochs, batch_size"):
        P.parse({"train": {"lrr": 0.1}})


@pytest.mark.parametrize("raw, message", [
    ({"train": {"lr": -1}}, r"train.lr = -1: Input should be greater than 0"),
    ({"data": {"val_fraction": 1.0}}, r"data.val_fraction = 1.0: Input should be less than 1"),
    ({"train": {"optimizer": "adagrad"}}, r"train.optimizer = 'adagrad': Input should be 'sgd'"),
    ({"model": {"name": "vgg"}}, r"model.name = 'vgg': Input should be 'net'"),
    ({"train": {"epochs": "ten"}}, r"train.epochs = 'ten': Input should be a valid integer"),
    ({"data": {"sha256": "abc"}}, r"data.sha256 = 'abc': String should match pattern"),
])
def test_bad_values_are_named(raw, message):
    with pytest.raises(ParamsError, match=message):
        P.parse(raw)


def test_numbers_written_as_strings_are_numbers():
    # `dvc exp run -S train.lr=1e-02` writes 1e-02, which YAML 1.1 reads as the string '1e-02'.
    params = P.parse({"train": {"lr": "1e-02", "epochs": "3"}})
    assert params.train.lr == 0.01 and params.train.epochs == 3


def test_flatten_uses_params_yaml_names():
    flat = P.flatten(P.Params())
    assert flat["train.lr"] == 0.001 and flat["seed"] == 0 and flat["data.train_size"] is None


def test_a_stage_exits_2_with_one_line_and_touches_nothing(workdir):
    write_params(workdir, **{"train.lrr": 0.1})
    (workdir / "data/raw").mkdir(parents=True)
    (workdir / "data/raw/keep.txt").write_text("untouched")
    result = run_stage("download", workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error (download): params.yaml: unknown key 'train.lrr' "
                               "(allowed here: epochs, batch_size, optimizer, lr,")
    assert (workdir / "data/raw/keep.txt").read_text() == "untouched"
