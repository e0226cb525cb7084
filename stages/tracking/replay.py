"""Send the logging that a dead tracking server missed: `python -m stages.tracking.replay`.

stages/tracking/runs.py journals every call a run could not send under
data/mlflow-missed/<run id>/; this sends each journal to its run, in order, and removes it when
all went through. A missed model is rebuilt from the journaled checkpoint and logged anew.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from stages import io as sio, params as P
from stages.errors import StageError
from stages.networks.build import build_model
from stages.runtime import repo_root
from stages.tracking import flavour
from stages.tracking.store import check_reachable

MISSED = Path("data/mlflow-missed")  # under the repository root


def replay(folder: Path) -> None:
    """Send a journal's calls to its run, in order; remove the journal when all went through."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    journal = sio.read_json(Path(folder) / "journal.json")
    uri, run_id = journal["tracking_uri"], journal["run_id"]
    check_reachable(uri)
    client = MlflowClient(uri)
    for call in journal["calls"]:
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
            client.log_artifact(run_id, call["file"], call["folder"])
        elif call["kind"] == "model":
            _replay_model(uri, run_id, Path(call["checkpoint"]))
        elif call["kind"] == "end":
            client.set_terminated(run_id, call["status"])
    shutil.rmtree(folder)


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


def main() -> None:
    """python -m stages.tracking.replay: send every journal under data/mlflow-missed/."""
    folders = sorted((repo_root() / MISSED).glob("*/journal.json"))
    for journal in folders:
        try:
            replay(journal.parent)
            print(f"replayed {journal.parent.name}")
        except StageError as exc:
            sys.exit(f"error (tracking): {exc}")
    if not folders:
        print(f"nothing to replay in {repo_root() / MISSED}")


if __name__ == "__main__":
    main()
