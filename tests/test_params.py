"""params.yaml is validated by one schema: clear one-line errors, numbers written as strings."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO, repository_params, run_stage, write_params

from stages import params as P
from stages.errors import ParamsError


def test_repository_params_are_valid():
    P.parse(repository_params())


def test_unknown_key_names_the_key_its_value_and_what_is_allowed():
    with pytest.raises(
        ParamsError,
        match=r"^params.yaml: unknown key 'train.lrr' = 0.1 "
        r"\(allowed here: epochs, batch_size",
    ):
        P.parse({"train": {"lrr": 0.1}})
    with pytest.raises(
        ParamsError,
        match=r"^params.yaml: unknown key 'train.early_stopping.patient' = "
        r"'3' \(allowed here: enabled, monitor, patience,",
    ):
        P.parse({"train": {"early_stopping": {"patient": "3"}}})


def test_a_long_value_is_cut_short_on_its_one_line():
    # a misspelled section: its whole content is the unknown key's value
    with pytest.raises(ParamsError) as exc:
        P.parse({"trian": {f"key_{i}": "x" * 20 for i in range(20)}})
    message = str(exc.value)
    assert message.startswith("params.yaml: unknown key 'trian' = {'key_0': 'xxxx")
    assert "…" in message and "\n" not in message and len(message) < 250


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"lr": -1}}, r"train.lr = -1: Input should be greater than 0"),
        ({"data": {"val_fraction": 1.0}}, r"data.val_fraction = 1.0: Input should be less than 1"),
        (
            {"train": {"optimizer": "adagrad"}},
            r"train.optimizer = 'adagrad': Input should be 'sgd'",
        ),
        ({"model": {"name": "vgg"}}, r"model.name = 'vgg': Input should be 'net'"),
        ({"train": {"epochs": "ten"}}, r"train.epochs = 'ten': Input should be a valid integer"),
        ({"train": {"epochs": "0x10"}}, r"train.epochs = '0x10': Input should be a valid integer"),
        ({"train": {"epochs": "1.5"}}, r"train.epochs = '1.5': Input should be a valid integer"),
        ({"train": {"lr": "0x10"}}, r"train.lr = '0x10': Input should be a valid number"),
        ({"train": {"lr": "ten"}}, r"train.lr = 'ten': Input should be a valid number"),
        ({"data": {"sha256": "abc"}}, r"data.sha256 = 'abc': String should match pattern"),
        ({"model": {"dropout": 1.0}}, r"model.dropout = 1.0: Input should be less than 1"),
        (
            {"train": {"early_stopping": {"monitor": "val_acc"}}},
            r"train.early_stopping.monitor = 'val_acc': Input should be 'val_loss' or 'val_accuracy'",
        ),
        # YAML reads `true` as a bool, which lax validation would take for 1 (or 0 for false)
        (
            {"train": {"epochs": True}},
            r"train.epochs = True: Input should be a number, not a boolean",
        ),
        ({"train": {"lr": False}}, r"train.lr = False: Input should be a number, not a boolean"),
        (
            {"data": {"train_size": True}},
            r"data.train_size = True: Input should be a number, not a boolean",
        ),
        ({"seed": False}, r"seed = False: Input should be a number, not a boolean"),
    ],
)
def test_bad_values_are_named(raw, message):
    with pytest.raises(ParamsError, match="^params.yaml: " + message):
        P.parse(raw)


FLOAT_KEYS = [
    "train.lr",
    "train.weight_decay",
    "train.l1",
    "augment.mixup_alpha",
    "train.early_stopping.min_delta",
]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize(
    "value, shown",
    [
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (float("nan"), "nan"),  # YAML .inf, -.inf, .nan
        ("inf", "'inf'"),
        ("-inf", "'-inf'"),
        ("nan", "'nan'"),
        ("Infinity", "'Infinity'"),  # -S key=inf
    ],
)
def test_infinity_and_nan_are_refused(key, value, shown):
    with pytest.raises(ParamsError) as exc:
        P.parse(P.with_changes({}, {key: value}))
    assert str(exc.value) == f"params.yaml: {key} = {shown}: Input should be a finite number"


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lr: .inf}", "train.lr = inf: Input should be a finite number"),
        ("train: {lr: inf}", "train.lr = 'inf': Input should be a finite number"),
        ("train: {epochs: true}", "train.epochs = True: Input should be a number, not a boolean"),
        (
            "train: {epochs: yes}",
            "train.epochs = True: Input should be a number, not a boolean",
        ),  # YAML 1.1
    ],
)
def test_yaml_spellings_are_refused(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text + "\n")
    with pytest.raises(ParamsError, match="^params.yaml: " + re.escape(message)):
        P.load(tmp_path / "params.yaml")


def test_numbers_written_as_strings_are_numbers():
    # `dvc exp run -S train.lr=1e-02` writes 1e-02, which YAML 1.1 reads as the string '1e-02'.
    params = P.parse(
        {
            "train": {
                "lr": "1e-02",
                "epochs": "3",
                "l1": "1e-06",
                "early_stopping": {"min_delta": "0.001", "patience": "10"},
            },
            "augment": {"mixup_alpha": "0.2", "flip": True},
            "data": {"train_size": "500"},
        }
    )
    assert params.train.lr == 0.01 and params.train.epochs == 3 and params.train.l1 == 1e-06
    assert (
        params.train.early_stopping.min_delta == 0.001
        and params.train.early_stopping.patience == 10
    )
    assert params.augment.mixup_alpha == 0.2 and params.data.train_size == 500
    assert params.augment.flip is True  # booleans stay booleans where a boolean belongs


def test_flatten_uses_params_yaml_names():
    flat = P.flatten(P.Params())
    assert flat["train.lr"] == 0.001 and flat["seed"] == 0 and flat["data.train_size"] is None


def _files(folder):
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


DUPLICATE_SECTION = "\ntrain:\n  epochs: 3\n"  # a second train: section pasted at the end


@pytest.mark.parametrize(
    "problem, message",
    [
        ("dropout", "params.yaml: model.dropout = 1.0: Input should be less than 1"),
        ("duplicate", "params.yaml: key 'train' is given twice (lines {first} and {second})"),
    ],
)
def test_every_stage_alone_exits_2_with_one_line_and_touches_nothing(workdir, problem, message):
    """Each stage checks params.yaml itself, before any work: also when run without DVC. A key
    given twice is refused as DVC refuses it: YAML loaders would let the second silently win."""
    if problem == "dropout":
        write_params(workdir, **{"model.dropout": 1.0})
    else:
        write_params(workdir)
        text = (workdir / "params.yaml").read_text()
        first = text.splitlines().index("train:") + 1
        second = len(text.splitlines()) + 2
        (workdir / "params.yaml").write_text(text + DUPLICATE_SECTION)
        message = message.format(first=first, second=second)
    for sentinel in [
        "data/params.ok",
        "data/raw/meta.json",
        "data/prepared/meta.json",
        "models/model.pt",
        "metrics/train.json",
        "metrics/eval.json",
    ]:
        (workdir / sentinel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / sentinel).write_bytes(f"sentinel {sentinel}\n".encode())
    before = _files(workdir)
    for stage in ["check", "download", "augment", "train", "evaluate"]:
        result = run_stage(stage, workdir)
        assert result.returncode == 2, (stage, result.stderr)
        assert result.stderr.strip().splitlines()[0].startswith(f"error ({stage}): {message}")
        assert len(result.stderr.strip().splitlines()) == 1, (stage, result.stderr)
        assert _files(workdir) == before, stage


def test_the_official_download_with_the_bundled_sha256_is_refused_with_the_fix():
    """-S data.source=cifar10 alone keeps the bundled file's sha256: say what to add."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = "cifar10"
    with pytest.raises(P.ParamsError, match=r"data.sha256 must be null .*-S data.sha256=null"):
        P.parse(raw)
    raw["data"]["sha256"] = None
    assert P.parse(raw).data.source == "cifar10"


def test_the_default_source_is_the_bundled_archive_with_its_hash():
    data = P.load(REPO / "params.yaml").data
    assert (
        (data.source, data.sha256)
        == (P.BUNDLED, P.BUNDLED_SHA256)
        == (
            P.Data().source,
            P.Data().sha256,
        )
    )
    assert (REPO / P.BUNDLED).is_file()
