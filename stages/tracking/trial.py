"""The seam between a search and the train stage: a trial that hears each epoch's validation
accuracy and says whether to stop.

A search (stages/experiments/engine.py) runs each of its trials as a DVC experiment. Before it
queues one, it writes `data/trials/<experiment name>.json` under the repository root: the Optuna
storage URL, the study's name and the trial's id. The train stage asks `for_this_run()` (which
reads the file named after `DVC_EXP_NAME`, the name DVC gives the experiment's stages) and,
when there is one, reports every epoch's validation accuracy to the trial; when the study's
pruner says so, training stops there. Outside a search there is no file, and nothing changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from stages import io as sio
from stages.runtime import repo_root

TRIALS = Path("data/trials")


@dataclass(frozen=True)
class Handle:
    """Where a trial lives: what the search writes and the train stage reads."""

    storage: str
    study: str
    trial_id: int
    number: int
    pruner: dict  # make_pruner's arguments: the study's pruner, which Optuna does not store


def handle_file(name: str, root: Path | None = None) -> Path:
    return (root or repo_root()) / TRIALS / f"{name}.json"


def write_handle(name: str, handle: Handle, root: Path | None = None) -> None:
    sio.write_json(handle_file(name, root), handle.__dict__)


class Trial:
    """A running Optuna trial, as the train stage sees it."""

    def __init__(self, handle: Handle):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name=handle.study, storage=handle.storage, pruner=make_pruner(**handle.pruner)
        )
        self.number = handle.number
        self._trial = optuna.trial.Trial(study, handle.trial_id)

    def should_stop(self, epoch: int, val_accuracy: float) -> bool:
        """Report the epoch's validation accuracy; whether the pruner stops the trial here."""
        self._trial.report(val_accuracy, epoch)
        return self._trial.should_prune()


def make_pruner(kind: str, min_epochs: int, epochs: int):
    """The search's pruner on per-epoch validation accuracy: Hyperband (brackets of successive
    halving, from min_epochs to the regime's epochs), successive halving alone, or none."""
    import optuna

    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs)
    return optuna.pruners.NopPruner()


def for_this_run() -> Trial | None:
    """The trial this run is, when a search queued it; None otherwise."""
    name = os.environ.get("DVC_EXP_NAME")
    file = handle_file(name) if name else None
    if file is None or not file.exists():
        return None
    return Trial(Handle(**json.loads(file.read_text())))
