"""The study grid and its queue handling."""

from __future__ import annotations

from stages import study

STATUS = """Task     Name                            Created    Status
0199407  study-wider-model-s0            02:37 AM   Success
c62c203  study-wider-model-s2            02:37 AM   Running
4fb4e8a  study-dropout-s0                02:37 AM   Queued
d9b05b9  study-l1-s0                     02:37 AM   Failed

Worker status: 1 active, 0 idle
"""


def test_pending_counts_queued_and_running_tasks():
    assert study.pending(STATUS) == 2
    assert study.pending("Task     Name    Created    Status\n\nWorker status: 0 active, 0 idle\n") == 0


def test_every_row_of_the_grid_is_valid_params():
    for row in study.ROWS:
        for seed in study.SEEDS:
            values = study.overrides(row, seed, "data.tar.gz", None)
            assert values["seed"] == seed and values["data.train_size"] in (5000, None)
    for row in study.FINETUNE_ROWS:
        values = study.overrides(row, 0, "data.tar.gz", None, grid="finetune")
        assert values["model.name"] == "efficientnet_lite0" and values["data.train_size"] in (1000, 5000)
    for row in study.MULTITASK_ROWS:
        values = study.overrides(row, 0, "data.tar.gz", None, grid="multitask")
        assert values["data.train_size"] == 5000
    # the row of the same name in two grids is one experiment: the same params in both
    assert (study.overrides("lite0-5000-imagenet", 1, None, None, grid="multitask")
            == study.overrides("lite0-5000-imagenet", 1, None, None, grid="finetune"))


def test_a_pass_under_other_names_or_another_grid_keeps_the_study_table():
    from pathlib import Path

    assert study.default_out("study", "regularization") == Path("reports/study.md")
    assert study.default_out("study", "finetune") == Path("reports/study-finetune.md")
    assert study.default_out("quick", "regularization") == Path("reports/quick.md")
