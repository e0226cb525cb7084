"""train and evaluate on tiny data: outputs, the one MLflow run, and bit-for-bit determinism."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from conftest import REPO, TINY, write_params
from mlflow.tracking import MlflowClient

from stages import augment, download, evaluate, io as sio, params as P, train
from stages.data import load_split
from stages.errors import StageError
from stages.networks import predict, small
from stages.tracking import runs, store


def run_pipeline(workdir, **overrides) -> None:
    write_params(workdir, **{**TINY, **overrides})
    download.main()
    augment.main()
    train.main()
    evaluate.main()


def client(workdir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.fixture
def finished(workdir, pickle_archive):
    run_pipeline(workdir, **{"data.source": str(pickle_archive), "train.epochs": 3})
    return workdir


def test_net_is_the_source_network():
    net = small.Net()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [
        (6, 3, 5, 5),
        (6,),
        (16, 6, 5, 5),
        (16,),
        (120, 400),
        (120,),
        (84, 120),
        (84,),
        (10, 84),
        (10,),
    ]
    assert predict.count_parameters(net) == 62006
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_defaults_are_the_source_recipe():
    params = P.Params()
    assert (
        params.model.name,
        params.train.optimizer,
        params.train.lr,
        params.train.momentum,
        params.train.batch_size,
        params.train.epochs,
    ) == ("net", "sgd", 0.001, 0.9, 100, 10)
    assert (
        not params.augment.flip and params.augment.crop_padding == 0 and params.augment.copies == 0
    )
    assert P.load(REPO / "params.yaml") == params  # params.yaml and the schema agree


def test_outputs_and_metrics(finished):
    t = json.loads((finished / "metrics/train.json").read_text())
    e = json.loads((finished / "metrics/eval.json").read_text())
    for key in (
        "train_accuracy",
        "val_accuracy",
        "train_loss",
        "val_loss",
        "epochs_run",
        "best_epoch",
    ):
        assert key in t
    assert t["epochs_run"] == 3 and 1 <= t["best_epoch"] <= 3
    for key in ("train_accuracy", "val_accuracy"):
        assert 0 <= t[key] <= 1
    assert 0 <= e["test_accuracy"] <= 1 and e["test_loss"] > 0
    assert e["generalization_gap"] == pytest.approx(t["train_accuracy"] - e["test_accuracy"])
    assert set(e["per_class_accuracy"]) == {"cat", "dog", "ship"}

    curves = (finished / "reports/train_curves.csv").read_text().splitlines()
    assert curves[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy" and len(curves) == 4
    confusion = (finished / "reports/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + 18

    checkpoint = sio.load_torch(finished / "models/model.pt")  # weights_only=True
    assert checkpoint["classes"] == ["cat", "dog", "ship"]
    assert P.parse(checkpoint["params"]).train.epochs == 3


def test_one_mlflow_run_holds_everything(finished, pickle_archive):
    c = client(finished)
    experiment = c.get_experiment_by_name("overfitting")
    found = c.search_runs([experiment.experiment_id])
    assert len(found) == 1
    run = found[0]
    assert run.info.run_id == json.loads((finished / "models/run.json").read_text())["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["model.name"] == "net"
    assert run.data.params["data.source"].endswith("tiny-cifar.tar.gz")
    history = c.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    for name in ("train_loss", "train_accuracy", "val_loss", "gap", "epoch_seconds"):
        assert len(c.get_metric_history(run.info.run_id, name)) == 3
    for name in (
        "test_accuracy",
        "test_loss",
        "generalization_gap",
        "final_train_accuracy",
        "num_parameters",
    ):
        assert name in run.data.metrics
    tags = run.data.tags
    assert {"git.commit", "git.dirty", "dvc.baseline_rev"} <= set(tags)
    params = P.load(finished / "params.yaml")  # the hash of exactly the params the run trained with
    assert tags["params_hash"] == runs.run_tags(params)["params_hash"]
    assert tags["params_hash"] != runs.run_tags(P.parse({"train": {"lr": 0.02}}))["params_hash"]
    assert tags["data.sha256"] == sio.sha256_of(pickle_archive)

    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {
        "params.yaml",
        "train.json",
        "train_curves.csv",
        "train_curves.png",
        "eval.json",
        "confusion.png",
        "confusion.csv",
        "augment_preview.png",
    } <= artifacts
    # The logged model loads back and predicts a batch of any size.
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(5, 3, 32, 32)).shape == (5, 3)
    # ... and says what it takes and gives: its signature.
    signature = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model").signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, 32, 32)}}
    ]
    assert signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3)}}
    ]


def test_same_params_same_bytes(workdir, pickle_archive):
    run_pipeline(workdir, **{"data.source": str(pickle_archive)})
    first = {
        p: (workdir / p).read_bytes()
        for p in [
            "metrics/train.json",
            "metrics/eval.json",
            "models/model.pt",
            "reports/train_curves.csv",
        ]
    }
    train.main()
    evaluate.main()
    for path, data in first.items():
        assert (workdir / path).read_bytes() == data, path
    assert (
        len(
            client(workdir).search_runs(
                [client(workdir).get_experiment_by_name("overfitting").experiment_id]
            )
        )
        == 2
    )


def test_where_a_run_is_logged_and_the_feature_cache_leave_the_outputs_alone(
    workdir, pickle_archive
):
    """mlflow.* and train.feature_cache are no DVC params of train (params.NOT_RESULT_KEYS), so
    the outputs may not hold them either; the MLflow run logs them all the same."""
    outputs = ["models/model.pt", "metrics/train.json", "metrics/eval.json"]
    run_pipeline(workdir, **{"data.source": str(pickle_archive)})
    first = {p: (workdir / p).read_bytes() for p in outputs}
    checkpoint = sio.load_torch(workdir / "models/model.pt")
    assert "mlflow" not in checkpoint["params"]
    assert "feature_cache" not in checkpoint["params"]["train"]
    write_params(
        workdir,
        **{
            **TINY,
            "data.source": str(pickle_archive),
            "mlflow.experiment": "elsewhere",
            "train.feature_cache": False,
        },
    )
    train.main()
    evaluate.main()
    for path, data in first.items():
        assert (workdir / path).read_bytes() == data, path
    c = client(workdir)
    (run,) = c.search_runs([c.get_experiment_by_name("elsewhere").experiment_id])
    assert run.data.params["mlflow.experiment"] == "elsewhere"
    assert run.data.params["train.feature_cache"] == "False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_evaluate_runs_where_the_model_trained(finished):
    """evaluate takes the trained model's train.device (auto: the GPU when there is one): a model
    trained for cuda is refused in one line here, without a GPU. On the CPU its test loss is the
    model's on the CPU, to the bit."""
    e = json.loads((finished / "metrics/eval.json").read_text())
    model, trained_with, _ = evaluate.load_model(evaluate.MODEL, image_size=32)
    assert trained_with.train.device == "auto"
    test_x, test_y = load_split(evaluate.RAW, "test")
    loss, accuracy = predict.loss_and_accuracy(predict.predict(model, test_x), test_y)
    assert (e["test_loss"], e["test_accuracy"]) == (loss, accuracy)

    checkpoint = sio.load_torch(evaluate.MODEL)
    checkpoint["params"]["train"]["device"] = "cuda"
    sio.save_torch(evaluate.MODEL, checkpoint)
    with pytest.raises(StageError, match="train.device = cuda, but PyTorch sees no CUDA GPU"):
        evaluate.main()


def test_other_seed_other_model(workdir, pickle_archive):
    run_pipeline(workdir, **{"data.source": str(pickle_archive)})
    first = (workdir / "models/model.pt").read_bytes()
    write_params(workdir, **{**TINY, "data.source": str(pickle_archive), "seed": 7})
    train.main()
    assert (workdir / "models/model.pt").read_bytes() != first


@pytest.mark.fresh_store  # the store is made elsewhere, not here
def test_run_name_and_tags_from_dvc_environment(
    workdir, pickle_archive, monkeypatch, tmp_path_factory
):
    main_repo = tmp_path_factory.mktemp("main-repo")
    monkeypatch.setenv("DVC_EXP_NAME", "zesty-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    monkeypatch.setenv("DVC_ROOT", str(main_repo))  # a queued experiment's temporary workspace
    run_pipeline(workdir, **{"data.source": str(pickle_archive), "train.epochs": 1})
    assert not (workdir / "mlflow.db").exists()
    run = client(main_repo).search_runs(
        [client(main_repo).get_experiment_by_name("overfitting").experiment_id]
    )[0]
    assert run.info.run_name == "zesty-lark"
    assert run.data.tags["dvc.exp_name"] == "zesty-lark"
    assert run.data.tags["dvc.baseline_rev"] == "abc123"
    assert "test_accuracy" in run.data.metrics  # evaluate found the run in the main store too
    assert (main_repo / "mlruns").is_dir()  # artifacts beside the store, not in the workspace


@pytest.mark.fresh_store  # the store is made elsewhere, not here
def test_tracking_uri_from_params_and_environment(workdir, pickle_archive, monkeypatch, tmp_path):
    db = tmp_path / "elsewhere.db"
    run_pipeline(
        workdir,
        **{
            "data.source": str(pickle_archive),
            "train.epochs": 1,
            "mlflow.experiment": "param-test",
            "mlflow.tracking_uri": f"sqlite:///{db}",
        },
    )
    assert db.exists() and not (workdir / "mlflow.db").exists()
    c = MlflowClient(f"sqlite:///{db}")
    (run,) = c.search_runs([c.get_experiment_by_name("param-test").experiment_id])
    assert "test_accuracy" in run.data.metrics  # evaluate found the run in the same store
    # MLFLOW_TRACKING_URI wins over the param; with neither, the repository's mlflow.db.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert store.tracking_uri(P.Mlflow(tracking_uri=f"sqlite:///{db}")) == "http://127.0.0.1:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert store.tracking_uri(P.Mlflow()) == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"


def curve(val_losses, train_losses):
    return [
        {"epoch": e, "val_loss": v, "train_loss": t}
        for e, (v, t) in enumerate(zip(val_losses, train_losses), 1)
    ]


def test_overfitting_epoch_on_scripted_curves():
    # Validation loss bottoms out at epoch 3 and rises while training loss keeps falling.
    assert (
        evaluate.overfitting_epoch(curve([2.0, 1.5, 1.2, 1.4, 1.9], [2.0, 1.4, 1.0, 0.6, 0.2])) == 3
    )
    # Both still falling: no overfitting yet.
    assert evaluate.overfitting_epoch(curve([2.0, 1.5, 1.2, 1.1], [2.0, 1.6, 1.3, 1.1])) is None
    # Validation loss rising together with training loss (divergence) is not overfitting.
    assert evaluate.overfitting_epoch(curve([2.0, 1.5, 1.8, 2.5], [2.0, 1.5, 1.9, 2.6])) is None


@pytest.mark.parametrize(
    "train_accuracy, gap, expected",
    [
        (0.37, -0.01, "underfitting"),  # the source recipe: poor on both
        (0.95, 0.51, "overfitting"),  # 5,000 images, 60 epochs: good on training data only
        (0.70, 0.05, "good_fit"),
        (0.70, 0.10, "good_fit"),  # the threshold itself is still a good fit
    ],
)
def test_verdict(train_accuracy, gap, expected):
    assert evaluate.verdict(train_accuracy, gap, P.Evaluate()) == expected


def test_verdict_is_written_and_logged(finished):
    e = json.loads((finished / "metrics/eval.json").read_text())
    assert e["verdict"] in {"overfitting", "underfitting", "good_fit"}
    assert "overfitting_epoch" in e and e["best_epoch"] >= 1
    run = client(finished).search_runs(
        [client(finished).get_experiment_by_name("overfitting").experiment_id]
    )[0]
    assert run.data.tags["verdict"] == e["verdict"]


def test_parallel_workers_create_one_experiment(tmp_path):
    """Four processes open runs at once in a new store and a new experiment: one experiment."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, {repo!r}); from stages import params as P; from stages.tracking import runs\n"
        "with runs.start_run(P.parse({{'mlflow': {{'experiment': 'race'}}}}), None): pass\n"
    )
    env = {**__import__("os").environ, "DVC_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code.format(repo=str(REPO))],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e for e in c.search_experiments() if e.name == "race"]
    assert len(experiments) == 1
    assert len(c.search_runs([experiments[0].experiment_id])) == 4
