"""Distributed data-parallel training with torchrun: 2 CPU processes with gloo."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, run_stage, write_params
from mlflow.tracking import MlflowClient

from stages import augment, download, evaluate, train
from stages.data import epoch_generator
from stages.errors import StageError

# One process and two take the same steps: the same global batch, split in two, whose gradients
# DDP averages. Only the order of floating-point sums differs, so the results may differ in the
# last bits; the tolerance allows that and no more than one test image of 18 changing its class.
TOLERANCE = {"loss": 1e-3, "accuracy": 1 / 18 + 1e-9}


def finished_runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("overfitting")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_two_processes_train_like_one(workdir, pickle_archive):
    params = {**TINY, "data.source": str(pickle_archive), "train.epochs": 3, "train.batch_size": 24}
    write_params(workdir, **params)
    download.main()
    augment.main()

    results = {}
    for nproc in (1, 2):
        write_params(workdir, **params, **{"train.nproc": nproc})
        before = {r.info.run_id for r in finished_runs(workdir)}
        if nproc == 1:
            train.main()
        else:  # the stage starts torchrun itself, as under `dvc exp run -S train.nproc=2`
            result = run_stage("train", workdir)
            assert result.returncode == 0, result.stderr[-3000:]
        evaluate.main()
        new = [r for r in finished_runs(workdir) if r.info.run_id not in before]
        assert len(new) == 1, f"{nproc} processes made {len(new)} MLflow runs"  # only rank 0 logs
        assert new[0].info.status == "FINISHED"
        results[nproc] = {
            **json.loads((workdir / "metrics/train.json").read_text()),
            **json.loads((workdir / "metrics/eval.json").read_text()),
            "world_size": new[0].data.metrics["world_size"],
            "state": torch.load(workdir / "models/model.pt", weights_only=True)["state_dict"],
        }

    one, two = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("train_loss", "val_loss", "test_loss"):
        assert abs(one[key] - two[key]) <= TOLERANCE["loss"], key
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert abs(one[key] - two[key]) <= TOLERANCE["accuracy"], key
    # the same weights up to float rounding: the two processes really shared the work
    for name, tensor in one["state"].items():
        assert torch.allclose(tensor, two["state"][name], atol=1e-4), name


def test_a_process_gets_its_share_of_each_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    seen = {0: [], 1: []}

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen[rank].append(x[:, 0, 0, 0].mul(255).round().long().tolist())
            return x.mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 2) * self.w

    for rank in (0, 1):
        model = Record()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with pytest.MonkeyPatch.context() as mp:  # no process group here: skip the all-reduce
            mp.setattr(train.dist, "all_reduce", lambda tensor: None)
            train.train_one_epoch(
                model,
                images,
                torch.zeros(10, dtype=torch.long),
                train.Recipe(optimizer, scheduler, torch.nn.functional.cross_entropy, 4),
                epoch_generator(0, 1),
                shard=(rank, 2),
            )
    # batches of 4 split 2 + 2; the last batch of 2 gives each process one image
    assert [len(b) for b in seen[0]] == [2, 2, 1] and [len(b) for b in seen[1]] == [2, 2, 1]
    together = sorted(i for r in (0, 1) for b in seen[r] for i in b)
    assert together == list(range(10))  # every image once per epoch, in one process or the other


def test_unfreezing_is_refused_under_ddp(workdir, monkeypatch):
    write_params(workdir, **{"model.freeze": "all_but_last_1", "train.unfreeze_at_epoch": 2})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(StageError, match="unfreeze_at_epoch can't be used with distributed"):
        train.main()
