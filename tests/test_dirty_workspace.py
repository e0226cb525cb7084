"""The test suite reads the committed params.yaml: `make test` after the README's tour, which
leaves its `dvc exp run -S` values in the workspace, passes without a `git checkout`."""

from __future__ import annotations

import subprocess
import sys

import yaml
from conftest import copy_repo

# What the README's tour leaves behind: its last `dvc exp run -S …` values, and a user's own data.
TOUR = {
    ("data", "train_size"): 5000,
    ("data", "source"): "my-photos/",
    ("data", "sha256"): None,
    ("train", "optimizer"): "adam",
    ("train", "lr"): 0.001,
    ("train", "epochs"): 15,
}


def test_stage_tests_pass_on_a_workspace_left_dirty_by_the_tour(tmp_path):
    repo = copy_repo(tmp_path)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True
        )
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for (section, key), value in TOUR.items():
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_augment.py::test_split_is_stratified_and_disjoint",
            "tests/test_params.py::test_repository_params_are_valid",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
    assert "train_size: 5000" in (repo / "params.yaml").read_text()  # the user's edits are kept
