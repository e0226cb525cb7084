"""A search's report: the best trial, its recipe rerun with more seeds, each param's importance,
the optimization history and a parallel-coordinates figure.

Reads the Optuna study (its storage) and the MLflow runs of its trials (`<prefix>-t<n>`) and of
the best recipe's rerun with other seeds (`<prefix>-t<n>-s<seed>`), and writes reports/<prefix>-search.md with
reports/<prefix>-search-history.png, -parallel.png and -importance.png, also logged to the
search's parent run. The best trial is chosen on validation accuracy; the test accuracy shown
for it is the rerun's (unpruned, several seeds), read once. Beside each param's value in the
best trial stands the strength a regularization path of the same regime chose for it alone
(the plan's `search.path`: reports/<path>-chosen.json), where it names one.
"""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

from stages import io as sio
from stages.errors import ParamsError
from stages.experiments import plan as plans, reports


def out_file(prefix: str, out_dir: Path = Path("reports")) -> Path:
    return out_dir / f"{prefix}-search.md"


def summary(study) -> dict:
    """Counts, epochs and minutes of the study's finished trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    ended = by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]
    minutes = sum(
        (t.datetime_complete - t.datetime_start).total_seconds() / 60
        for t in ended
        if t.datetime_complete and t.datetime_start
    )
    spans = sorted((t.datetime_start, t.datetime_complete) for t in ended if t.datetime_complete)
    return {
        "wall_minutes": busy_seconds(spans) / 60,
        "complete": len(by_state[TrialState.COMPLETE]),
        "pruned": len(by_state[TrialState.PRUNED]),
        "failed": len(by_state[TrialState.FAIL]),
        "epochs": sum(len(t.intermediate_values) for t in ended),
        "minutes": minutes,
    }


def busy_seconds(spans: list[tuple]) -> float:
    """The time some trial was running: the union of the (start, end) spans, sorted by start
    (trials side by side count once; a pause between two runs of the command not at all)."""
    total, end = 0.0, None
    for start, stop in spans:
        if end is None or start > end:
            total += (stop - start).total_seconds()
            end = stop
        elif stop > end:
            total += (stop - end).total_seconds()
            end = stop
    return total


def reached(study, target: float) -> dict | None:
    """When the search first reached validation accuracy `target`: the first trial to end with
    it (by the time it ended), and the epochs of every trial that had started by then, whatever
    its state (pruned, failed, still running), counted whole (a trial running beside it may have
    gone on after: an upper bound). None if none did."""
    from optuna.trial import TrialState

    started = [t for t in study.get_trials(deepcopy=False) if t.datetime_start]
    hits = [
        t
        for t in started
        if t.state == TrialState.COMPLETE and t.datetime_complete and t.value >= target
    ]
    if not hits:
        return None
    first = min(hits, key=lambda t: t.datetime_complete)
    by_then = [t for t in started if t.datetime_start <= first.datetime_complete]
    return {
        "trial": first.number,
        "value": first.value,
        "trials": len(by_then),
        "epochs": sum(len(t.intermediate_values) for t in by_then),
    }


def rerun_of_best(plan: plans.Plan, by_name: dict, prefix: str, best) -> dict[int, object]:
    """{seed: run} of the best recipe, unpruned: the best trial itself (it ended unpruned) for
    the trials' seed, its reruns `<prefix>-t<n>-s<seed>` for the others."""
    found = {}
    for seed in plan.search["seeds_of_the_best"]:
        name = (
            plans.trial_name(prefix, best.number)
            if seed == plan.seeds[0]
            else plans.exp_name(prefix, f"t{best.number}", seed)
        )
        if name in by_name:
            found[seed] = by_name[name]
    return found


def text(plan: plans.Plan, study, prefix: str, by_name: dict, chosen_alone: dict | None) -> str:
    counts = summary(study)
    best = study.best_trial
    compare = chosen_alone is not None  # a path of the same regime, named by the plan
    lines = [
        f"# {prefix}: a joint search (plan {plan.name})",
        "",
        f"{counts['complete'] + counts['pruned']} trials ({counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['failed']} failed), {counts['epochs']} epochs, "
        f"{counts['minutes']:.0f} minutes of trials, each from its start to its end, queueing "
        f"included ({counts['wall_minutes']:.0f} minutes while some trial ran: workers side by "
        f"side count once; the reruns of the best not included). Each trial is seed "
        f"{plan.seeds[0]}; the best is chosen on validation accuracy (the value Optuna maximizes), and its recipe is "
        "then rerun unpruned with more seeds, whose test accuracy is read once.",
        "",
        *target_lines(plan, study, prefix, counts),
        f"## The best trial: {plans.trial_name(prefix, best.number)}",
        "",
        f"Validation accuracy {100 * best.value:.1f}% (the trial, seed {plan.seeds[0]}).",
        "",
        "| param | best trial |" + (" chosen alone by its path |" if compare else ""),
        "|---|---|" + ("---|" if compare else ""),
    ]
    for param, value in best.params.items():
        alone = f" {_show(chosen_alone.get(param, '—'))} |" if compare else ""
        lines.append(f"| `{param}` | {_show(value)} |{alone}")
    rerun = rerun_of_best(plan, by_name, prefix, best)
    lines += ["", "## Its recipe rerun (unpruned)", ""]
    if rerun:
        val = [100 * r.data.metrics["final_val_accuracy"] for r in rerun.values()]
        test = [100 * r.data.metrics["test_accuracy"] for r in rerun.values()]
        lines.append(
            f"Seeds {', '.join(map(str, sorted(rerun)))}: validation {_pm(val)}, "
            f"**test {_pm(test)}**."
        )
    else:
        lines.append("Not run yet (`run` reruns it once the trials are done).")
    importances = param_importances(study)
    if importances:
        lines += ["", "## Importance of each param (fANOVA over the finished trials)", ""]
        lines += ["| param | importance |", "|---|---|"]
        lines += [f"| `{p}` | {v:.2f} |" for p, v in importances.items()]
    runs = len(rerun) + sum(1 for t in study.get_trials(deepcopy=False) if t.value is not None)
    return "\n".join([*lines, "", reports.RUNS_LINE.format(n=runs)]) + "\n"


def target_lines(plan: plans.Plan, study, prefix: str, counts: dict) -> list[str]:
    """The plan's search.target against what the search spent reaching it."""
    target = plan.search.get("target")
    if not target:
        return []
    goal, budget = 100 * target["val_accuracy"], target["epochs"]
    hit = reached(study, target["val_accuracy"])
    if hit is None:
        line = (
            f"Validation accuracy {goal:.1f}% (the target): **not reached** in "
            f"{counts['epochs']} epochs ({100 * counts['epochs'] / budget:.0f}% of the {budget} "
            "epochs the other way spent)."
        )
    else:
        line = (
            f"Validation accuracy {goal:.1f}% (the target): first reached by "
            f"{plans.trial_name(prefix, hit['trial'])} ({100 * hit['value']:.1f}%), after at most "
            f"{hit['epochs']} epochs in {hit['trials']} trials "
            f"(**{100 * hit['epochs'] / budget:.0f}%** of the {budget} epochs the other way spent)."
        )
    return [line, ""]


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pm(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}%"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}%"


def param_importances(study) -> dict[str, float]:
    """optuna.importance over the complete trials; empty while there are too few of them."""
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # fewer than two complete trials, or one param's value
        return {}


def figures(study, prefix: str, out_dir: Path) -> list[Path]:
    """History, parallel coordinates and importances, as PNG files (those Optuna can draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as draw

    files = []
    kinds = {
        "history": draw.plot_optimization_history,
        "parallel": draw.plot_parallel_coordinate,
        "importance": draw.plot_param_importances,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        for kind, plot in kinds.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError):  # too few trials to draw it
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(10, 5)
            fig.tight_layout()
            files.append(out_dir / f"{prefix}-search-{kind}.png")
            sio.save_figure(files[-1], fig)
            plt.close(fig)
    return files


def build(
    plan: plans.Plan,
    prefix: str,
    storage: str,
    force: bool = False,
    out_dir: Path = Path("reports"),
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> Path:
    """The report of the search `prefix` in `storage`; its path. ParamsError when there is no
    finished trial yet (nothing written)."""
    import optuna

    try:
        study = optuna.load_study(study_name=prefix, storage=storage)
        best = study.best_trial
    except (KeyError, ValueError):
        raise ParamsError(f"no finished trial of search {prefix!r} in {storage}") from None
    del best
    client, experiment_id, _, _ = reports.open_experiment(tracking_uri, experiment)
    by_name = reports.finished_runs(client, experiment_id, prefix) if experiment_id else {}
    chosen_alone = None  # the search's own regime has no path to compare with
    path_choices = Path("reports") / f"{plan.search.get('path')}-chosen.json"
    if plan.search.get("path") and path_choices.exists():
        chosen_alone = {
            c["param"]: "none (the baseline)" if c["baseline"] else c["value"]
            for c in json.loads(path_choices.read_text()).values()
        }
    report = out_file(prefix, out_dir)
    table = text(plan, study, prefix, by_name, chosen_alone)
    reports.check_not_less(report, table, force)
    files = figures(study, prefix, out_dir)
    sio.write_text(report, table)
    if experiment_id:
        reports.log_to_parent(
            client, experiment_id, prefix, plan.name, [*files, report], list(by_name.values())
        )
    return report
