"""Stages start their work at once: importing a stage module loads no heavy library it does not
need at start (torchvision, matplotlib, MLflow, pandas), each of which costs seconds; they are
imported where they are used. Checked on sys.modules in a fresh interpreter: no timings here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Top-level packages a stage must not load just by being imported. MLflow (all of it: `import
# mlflow` alone pulls in pandas, FastAPI and its GenAI modules) is imported when the run opens,
# after the tracking server check and the data; matplotlib when a plot is drawn; torchvision when
# an augmentation, mixer or network of it is used; timm when a timm/<architecture> is named.
HEAVY = {"torchvision", "timm", "matplotlib", "mlflow", "pandas", "sklearn", "scipy", "fastapi"}
NO_TORCH = {"check", "download"}  # these never need torch


def loaded_modules(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


@pytest.mark.parametrize("stage", ["check", "download", "augment", "train", "evaluate"])
def test_stage_imports_no_heavy_module(stage):
    loaded = loaded_modules(f"stages.{stage}")
    forbidden = HEAVY | ({"torch"} if stage in NO_TORCH else set())
    assert not loaded & forbidden, (
        f"importing stages.{stage} loads {sorted(loaded & forbidden)}: import them where they "
        f"are used (python -X importtime -c 'import stages.{stage}' shows who pulls them in)"
    )


def test_tracking_modules_import_no_mlflow():
    """The reachability check and the run's helpers come before MLflow itself."""
    for module in (
        "stages.tracking.store",
        "stages.tracking.runs",
        "stages.tracking.replay",
        "stages.tracking.journal",
    ):
        assert "mlflow" not in loaded_modules(module), module
