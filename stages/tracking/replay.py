"""Send journaled logging to MLflow: `python -m stages.tracking.replay [FOLDER] [--tracking-uri URI]`.

Two journals hold the same logging calls (metrics with their step and time, tags, artifacts, the
model's checkpoint, the run's end), and are sent the same way:

- without FOLDER: the logging that a dead tracking server missed. stages/tracking/runs.py
  journals every call a run could not send under data/mlflow-missed/<run id>/; each journal is
  sent to its run, in order, and removed when all went through.
- with FOLDER: the runs of a machine without MLflow (tracking URI `journal:<folder>`,
  stages/tracking/journal.py). Each journaled run becomes one MLflow run of the store (--tracking-uri,
  else $MLFLOW_TRACKING_URI, `mlflow.tracking_uri` or mlflow.db, as for the stages) with the same
  experiment, name, tags, params, metrics, artifacts, model and status, and the tag
  journal.run_id. A run already replayed is skipped, so replaying again adds nothing; one whose
  replay was cut short is replayed anew. The journal stays as it is.

A missed or journaled model is rebuilt from its checkpoint and logged anew.

`--records FILE.json` (with FOLDER): first writes into FOLDER, as journaled runs, the records of
a file of experiments run before the stages journaled their runs (the committed
reports/gpu/*-runs.json: a list of {name, params, train, evaluate}, without a run id), then
replays FOLDER. Each such run holds what its record holds (params, train's final metrics,
evaluate's metrics and verdict; no per-epoch curves, artifacts or model) and the tag
journal.record (the file's name); its id is made from the file's name and the record's, so doing
it again writes nothing new and replays nothing twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

from stages import io as sio, params as P
from stages.errors import StageError
from stages.networks.build import build_model
from stages.runtime import repo_root
from stages.tracking import flavour, journal, store
from stages.tracking.store import check_reachable

MISSED = Path("data/mlflow-missed")  # under the repository root
REPLAYED = "journal.run_id"  # the tag naming the journaled run an MLflow run was replayed from
COMPLETE = "journal.replayed"  # set when all of it went through


def replay(folder: Path) -> None:
    """Send a missed-logging journal's calls to its run, in order; remove the journal when all
    went through."""
    from mlflow.tracking import MlflowClient

    missed = sio.read_json(Path(folder) / "journal.json")
    uri, run_id = missed["tracking_uri"], missed["run_id"]
    check_reachable(uri)
    send(MlflowClient(uri), uri, run_id, missed["calls"], Path(folder))
    shutil.rmtree(folder)


def send(client, uri: str, run_id: str, calls: list[dict], folder: Path) -> None:
    """The calls, in order, to the MLflow run `run_id`; their files' paths are under `folder`
    (or absolute)."""
    from mlflow.entities import Metric

    for call in calls:
        if call["kind"] == "metrics":
            client.log_batch(
                run_id,
                metrics=[
                    Metric(k, v, call["timestamp"], call["step"] or 0)
                    for k, v in call["metrics"].items()
                ],
            )
        elif call["kind"] == "tags":
            for key, value in call["tags"].items():
                client.set_tag(run_id, key, value)
        elif call["kind"] == "artifact":
            client.log_artifact(run_id, str(folder / call["file"]), call["folder"])
        elif call["kind"] == "model":
            _replay_model(uri, run_id, folder / call["checkpoint"])
        elif call["kind"] == "end":
            client.set_terminated(run_id, call["status"], end_time=call.get("time"))


def _replay_model(uri: str, run_id: str, checkpoint: Path) -> None:
    import mlflow
    import torch

    saved = sio.load_torch(checkpoint)
    params = P.parse(saved["params"])
    model = build_model(params, len(saved["classes"]), params.data.image_size)
    model.load_state_dict(saved["state_dict"])
    example = torch.rand(2, 3, params.data.image_size, params.data.image_size)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        flavour.log_model(model.eval(), example, checkpoint)


def replay_journal(folder: Path, uri: str) -> dict[str, list[str]]:
    """Every run journaled under `folder` into the store at `uri`: the journaled run ids that
    were replayed, were there already, and are still open (not replayed: a run is replayed once
    it has ended, evaluate's logging included)."""
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(uri)
    outcome: dict[str, list[str]] = {"replayed": [], "there": [], "open": []}
    for path in sorted(Path(folder).glob(f"*/{journal.JOURNAL}")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        if lines[-1]["kind"] != "end":
            outcome["open"].append(path.parent.name)
        elif _replay_run(client, uri, path.parent, lines):
            outcome["replayed"].append(path.parent.name)
        else:
            outcome["there"].append(path.parent.name)
    return outcome


def _replay_run(client, uri: str, folder: Path, lines: list[dict]) -> bool:
    """One journaled run as a new MLflow run; False when a complete replay of it is there."""
    from mlflow.entities import Param

    (start, params), calls = lines[:2], lines[2:]
    experiment_id = store.experiment_id(start["experiment"], uri)
    for found in client.search_runs(
        [experiment_id], filter_string=f"tags.`{REPLAYED}` = '{folder.name}'"
    ):
        if found.data.tags.get(COMPLETE) == "true":
            return False
        client.delete_run(found.info.run_id)  # cut short: replayed anew
    run = client.create_run(
        experiment_id,
        start_time=start["time"],
        tags={**start["tags"], REPLAYED: folder.name},
        run_name=start["run_name"],
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params["params"].items()])
    send(client, uri, run_id, calls, folder)
    client.set_tag(run_id, COMPLETE, "true")
    return True


def journal_records(records: list[dict], folder: Path, source: str) -> int:
    """The records that have no run id (they predate the journal) as runs journaled in `folder`,
    each with what its record holds; those journaled before are skipped. How many were written."""
    written = 0
    for record in records:
        run_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{source}#{record['name']}").hex
        if "run_id" in record or (folder / run_id).exists():
            continue
        run = journal.start(
            f"journal:{folder.resolve()}",
            record["params"]["mlflow.experiment"],
            record["name"],
            {"dvc.exp_name": record["name"], "journal.record": source},
            record["params"],
            run_id=run_id,
        )
        train, evaluate = record["train"], record["evaluate"]
        now = journal.now()
        run.log_metrics({f"final_{k}": v for k, v in train.items() if _is_number(v)}, None, now)
        run.log_metrics(  # what evaluate.log_to_run logs
            {
                **{
                    k: v
                    for k, v in evaluate.items()
                    if k.startswith(("test_", "wise_")) and _is_number(v)
                },
                "generalization_gap": evaluate["generalization_gap"],
                "overfitting_epoch": evaluate["overfitting_epoch"] or 0,
                **{f"test_accuracy.{c}": v for c, v in evaluate["per_class_accuracy"].items()},
            },
            None,
            now,
        )
        for row in evaluate.get("wise_curve", {}).values():
            run.log_metrics(
                {
                    "wise_curve_val_accuracy": row["val_accuracy"],
                    "wise_curve_test_accuracy": row["test_accuracy"],
                },
                round(100 * row["alpha"]),
                now,
            )
        tags = {"verdict": evaluate["verdict"]}
        if "wise_fine_tuned_best" in evaluate:
            tags["wise_fine_tuned_best"] = str(evaluate["wise_fine_tuned_best"]).lower()
        run.set_tags(tags)
        run.write({"kind": "end", "status": "FINISHED", "time": journal.now()})
        written += 1
    return written


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.tracking.replay",
        description="Send journaled logging to MLflow: without FOLDER, the logging that a dead "
        "tracking server missed (data/mlflow-missed/); with FOLDER, the runs journaled there "
        "(tracking URI journal:FOLDER) as one MLflow run each.",
    )
    parser.add_argument("folder", nargs="?", type=Path, help="a journal:FOLDER's folder")
    parser.add_argument(
        "--tracking-uri", help="the store to replay FOLDER into (default: as for the stages)"
    )
    parser.add_argument(
        "--records",
        type=Path,
        metavar="FILE.json",
        help="first journal into FOLDER the records of FILE that predate the journal "
        "(reports/gpu/*-runs.json)",
    )
    args = parser.parse_args()
    try:
        if args.records and args.folder is None:
            raise StageError("--records needs the FOLDER to journal them into")
        if args.folder is None:
            replay_missed()
        else:
            uri = args.tracking_uri or store.tracking_uri(
                P.load().mlflow if Path(P.PARAMS_FILE).exists() else P.Mlflow()
            )
            if journal.is_journal(uri):
                raise StageError(f"{uri} is a journal, not an MLflow store: pass --tracking-uri")
            if args.records:
                if not args.records.is_file():
                    raise StageError(f"{args.records}: no such file")
                records = json.loads(args.records.read_text())
                written = journal_records(records, args.folder, args.records.name)
                print(f"{written} records journaled into {args.folder}")
            if not args.folder.is_dir():
                raise StageError(f"{args.folder}: no such folder")
            outcome = replay_journal(args.folder, uri)
            print(
                f"{len(outcome['replayed'])} runs replayed into {uri}, "
                f"{len(outcome['there'])} already there"
            )
            if outcome["open"]:
                print(f"still open, not replayed: {', '.join(outcome['open'])}")
    except StageError as exc:
        sys.exit(f"error (tracking): {exc}")


def replay_missed() -> None:
    """Send every journal under data/mlflow-missed/."""
    folders = sorted((repo_root() / MISSED).glob("*/journal.json"))
    for missed in folders:
        replay(missed.parent)
        print(f"replayed {missed.parent.name}")
    if not folders:
        print(f"nothing to replay in {repo_root() / MISSED}")


if __name__ == "__main__":
    main()
