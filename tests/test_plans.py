"""Plans (stages/experiments/plans/*.yaml): one format, read and checked before anything is
queued; rows, paths and search spaces expand into named experiments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import params as P
from stages.errors import ParamsError
from stages.experiments import plan as plans


def write(tmp_path, monkeypatch, text: str, name: str = "mine") -> plans.Plan:
    monkeypatch.setattr(plans, "PLANS_DIR", tmp_path)
    (tmp_path / f"{name}.yaml").write_text(text)
    return plans.load(name, base=P.read_yaml())


def test_every_committed_plan_loads_and_every_experiment_is_valid_params():
    for name in plans.names():
        plan = plans.load(name)
        if plan.kind != "space":
            todo = plans.experiments(plan, plans.select(plan, None), list(plan.seeds), "p")
            assert len({n for n, _ in todo}) == len(todo), name
    study = plans.load("regularization")
    assert study.kind == "rows" and study.prefix == "study" and len(study.rows) == 16
    todo = dict(plans.experiments(study, ["crop-flip"], [0], "study"))
    assert todo["study-crop-flip-s0"] == {
        "data.train_size": 5000,
        "train.epochs": 60,
        "train.lr": 0.01,
        "augment.online": True,
        "augment.flip": True,
        "augment.crop_padding": 4,
        "seed": 0,
    }  # the shared block, merged
    # the row of the same name in two plans is one experiment: the same name and params
    finetune, multitask = plans.load("finetune"), plans.load("multitask")
    one = plans.experiments(finetune, ["lite0-5000-imagenet"], [1], finetune.prefix)
    assert one == plans.experiments(multitask, ["lite0-5000-imagenet"], [1], multitask.prefix)


def test_a_path_expands_into_the_names_the_first_pass_ran_under():
    sweep = plans.load("sweep")
    todo = plans.experiments(sweep, plans.select(sweep, None), [0, 1], "sweep")
    names = [name for name, _ in todo]
    assert names[:3] == ["sweep-baseline-s0", "sweep-l1-1e-05-s0", "sweep-l1-0.0001-s0"]
    assert "sweep-l2-0.0001-s0" in names and "sweep-dropout-0.5-s1" in names
    assert names.index("sweep-baseline-s1") == len(names) // 2  # seed by seed
    changes = dict(todo)["sweep-early-stopping-20-s1"]
    assert changes["train.early_stopping.enabled"] is True and changes["seed"] == 1
    assert changes["train.early_stopping.patience"] == 20 and changes["train.epochs"] == 60
    two = plans.experiments(sweep, ["l2", "dropout"], [0], "quick")
    assert [n for n, _ in two] == [
        "quick-baseline-s0",
        *(f"quick-l2-{v}-s0" for v in ("0.0001", "0.001", "0.01")),
        *(f"quick-dropout-{v}-s0" for v in ("0.3", "0.5", "0.7")),
    ]


def test_labels():
    assert [plans.label(v) for v in (1e-05, 0.0001, 0.5, 3, None, True, False)] == [
        "1e-05",
        "0.0001",
        "0.5",
        "3",
        "none",
        "true",
        "false",
    ]


def test_points_and_no_baseline_make_a_learning_curve(tmp_path, monkeypatch):
    plan = write(
        tmp_path,
        monkeypatch,
        "baseline: false\nseeds: [3]\ntechniques:\n"
        "  plain: {param: data.train_size, scale: log, points: [\n"
        "    {data.train_size: 1000, train.epochs: 40}, {data.train_size: null, train.epochs: 10}]}\n",
    )
    assert plans.experiments(plan, ["plain"], [3], "lc", {"train.lr": 0.1}) == [
        (
            "lc-plain-1000-s3",
            {"data.train_size": 1000, "train.epochs": 40, "seed": 3, "train.lr": 0.1},
        ),
        (
            "lc-plain-none-s3",
            {"data.train_size": None, "train.epochs": 10, "seed": 3, "train.lr": 0.1},
        ),
    ]


def test_a_space_is_read_with_its_conditions_and_search_settings(tmp_path, monkeypatch):
    plan = write(
        tmp_path,
        monkeypatch,
        "regime: {train.epochs: 4}\nseeds: [0]\nsearch: {seed: 7, pruner: halving}\nspace:\n"
        "  train.lr: {log_uniform: [1.0e-3, 0.1]}\n"
        "  model.dropout: {uniform: [0.0, 0.5]}\n"
        "  augment.online: {categorical: [false, true]}\n"
        "  augment.crop_padding: {int: [1, 4], when: {augment.online: true}}\n",
    )
    assert plan.kind == "space" and plan.rows == {}
    assert [d.param for d in plan.space][-1] == "augment.crop_padding"
    assert plan.space[-1].when == {"augment.online": True}
    assert plan.search == {
        "seed": 7,
        "pruner": "halving",
        "min_epochs": 1,
        "seeds_of_the_best": [0, 1, 2],
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("rows:\n  a: {train.lrr: 0.1}\n", "row 'a': params.yaml: unknown key 'train.lrr'"),
        ("rows:\n  a: {train.lr: -1}\n", "row 'a': params.yaml: train.lr = -1"),
        ("rows: {}\n", "at least one row"),
        ("regime: {}\nrowz:\n  a: {}\n", "unknown: rowz"),
        ("rows:\n  a: [1, 2]\n", "row 'a' must map params to values"),
        ("rows: [\n", "not valid YAML"),
        ("rows: {a: {}}\ntechniques: {}\n", "it has rows and techniques"),
        ("techniques:\n  l2: {param: train.l2, values: []}\n", "technique 'l2': no values"),
        ("techniques: {}\n", "at least one technique"),
        (
            "techniques:\n  a: {param: x, values: [1], points: [{x: 1}]}\n",
            "either values or points",
        ),
        ("techniques:\n  a: {param: x, points: [{y: 1}]}\n", "every point must set x"),
        ("techniques:\n  a: {values: [1]}\n", "expected {param, values | points"),
        ("techniques:\n  l2: {param: train.l2, values: [1.0e-4, -1]}\n", "train.l2 = -1"),
        # a search's space: every bad input is one line, before anything is queued
        ("space: {}\n", "an empty search space"),
        ("space:\n  train.lrr: {uniform: [0.1, 0.2]}\n", "unknown key 'train.lrr'"),
        ("space:\n  model.dropout: {uniform: [0.0, 1.5]}\n", "model.dropout = 1.5"),
        ("space:\n  train.lr: {log_uniform: [0, 0.1]}\n", "log_uniform needs low > 0"),
        ("space:\n  train.lr: {uniform: [0.1, 0.01]}\n", "[low, high] with low < high"),
        ("space:\n  train.epochs: {int: [1, 2.5]}\n", "int takes whole numbers"),
        ("space:\n  train.lr: {normal: [0, 1]}\n", "expected one of log_uniform"),
        ("space:\n  train.lr: {uniform: [0.01, 0.1], when: {x: 1}}\n", "when names params"),
        ("search: {pruner: median}\nspace:\n  train.lr: {uniform: [0.01, 0.1]}\n", "pruner"),
        (
            "search: {target: {val_accuracy: 0.5}}\nspace:\n  train.lr: {uniform: [0.01, 0.1]}\n",
            "search.target is {val_accuracy: a fraction in (0, 1], epochs: a count}",
        ),
        (  # a percentage where a fraction belongs: never reached
            "search: {target: {val_accuracy: 56.7, epochs: 100}}\nspace:\n"
            "  train.lr: {uniform: [0.01, 0.1]}\n",
            "search.target is {val_accuracy: a fraction in (0, 1]",
        ),
    ],
)
def test_a_bad_plan_is_refused_with_one_line(tmp_path, monkeypatch, text, message):
    with pytest.raises(ParamsError) as err:
        write(tmp_path, monkeypatch, text)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ParamsError, match="no plan 'nope' \\(known: mine\\)"):
        plans.load("nope", base={})


def test_unknown_rows_or_techniques_are_named(tmp_path, monkeypatch):
    plan = write(tmp_path, monkeypatch, "techniques:\n  l2: {param: train.l2, values: [1.0e-4]}\n")
    with pytest.raises(ParamsError, match="unknown technique l3; the plan has: l2"):
        plans.select(plan, "l2,l3")
    with pytest.raises(ParamsError) as err:  # --set over every experiment is checked too
        plans.experiments(plan, ["l2"], [0], "p", {"train.lr": -1.0})
    assert str(err.value).startswith("p-baseline-s0: params.yaml: train.lr = -1")


def test_uncommitted_params_are_refused(tmp_path, monkeypatch):
    """Experiments are built from the committed params.yaml: after a `dvc exp run -S
    model.dropout=0.3` left its value in the workspace, a study would label a dropout run
    `baseline`."""
    monkeypatch.chdir(tmp_path)
    git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True)
    git("init", "-q")
    Path("params.yaml").write_text(yaml.safe_dump({"model": {"dropout": 0.0}, "seed": 0}))
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    plans.check_committed_params(Path("params.yaml"))  # clean: fine
    Path("params.yaml").write_text(yaml.safe_dump({"model": {"dropout": 0.3}, "seed": 0}))
    with pytest.raises(ParamsError, match=r"uncommitted changes \(model.dropout=0.3\)"):
        plans.check_committed_params(Path("params.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "stages.experiments.engine", "run", "--grid", "regularization"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().startswith("error (engine): params.yaml has uncommitted")
    assert "Traceback" not in result.stderr


def test_a_searchs_path_to_compare_with_is_a_plan(tmp_path):
    """search.path names the plan whose regularization path shares the search's regime: the
    report shows that path's choices beside the best trial's (joint: sweep); a fine-tuning
    search has none; a name that is no plan is one line."""
    assert plans.load("joint").search["path"] == "sweep"
    assert "path" not in plans.load("finetune-cpu-search").search
    (tmp_path / "bad.yaml").write_text(
        "search: {path: nosuch}\nspace:\n  train.lr: {log_uniform: [0.01, 0.1]}\n"
    )
    with pytest.raises(ParamsError, match="search.path names a plan"):
        plans.load(tmp_path / "bad.yaml")


def test_a_searchs_first_point_lies_in_its_space(tmp_path):
    """search.first: params of the space, each inside its distribution; anything else is one
    line naming the param."""
    space = "space:\n  train.lr: {log_uniform: [0.01, 0.1]}\n  model.freeze: {categorical: [none, backbone]}\n"
    cases = {
        "{first: {train.lr: 0.05, model.freeze: backbone}}": None,
        "{first: {train.lr: 0.5}}": "train.lr = 0.5 is outside its log_uniform",
        "{first: {model.freeze: head}}": "model.freeze = 'head' is outside its categorical",
        "{first: {train.epochs: 3}}": "'train.epochs' is not in the space",
        "{first: 3}": "search.first maps params of the space to values",
    }
    for search, error in cases.items():
        (tmp_path / "s.yaml").write_text(f"search: {search}\n{space}")
        if error is None:
            assert plans.load(tmp_path / "s.yaml").search["first"]["train.lr"] == 0.05
        else:
            with pytest.raises(ParamsError, match=error):
                plans.load(tmp_path / "s.yaml")
