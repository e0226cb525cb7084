"""The regularization path: each technique of a `techniques` plan at every strength, against the
baseline (stages/experiments/engine.py builds it after a run, and on `report`).

Reads the plan's finished runs back from MLflow by their DVC experiment names and writes:

- reports/<prefix>-path-<technique>.png: train accuracy, test accuracy and the gap (train − test)
  against the strength, mean over seeds with a ±1 std band; the baseline (no regularization,
  strength 0, which a log axis can't show) as dashed horizontal lines in the same colours; the
  strength chosen on validation marked.
- reports/<prefix>-path.md: per technique and strength, mean ± std over seeds of train,
  validation and test accuracy and the gap, and the paired differences with the baseline, seed by
  seed (the same seed is the same split, subset and initialization, so the pairing removes their
  share of the noise): Δtest and Δgap with a 95% t-interval over seeds, and a verdict (helps /
  hurts / within noise: whether the interval of Δtest excludes 0). Only techniques with finished
  runs are shown.
- reports/<prefix>-chosen.json: each technique's strength with the highest mean *validation*
  accuracy (the baseline included), its validation and test accuracy and seeds, to rerun the
  chosen strengths with more seeds. The test set plays no part in the choice: choosing on it
  would make the test accuracy of the chosen strength an optimistic estimate.

The files are also artifacts of the pass's MLflow parent run (stages/experiments/reports), under
which every run of the path is nested.

A plan with `baseline: false` is a learning curve: its techniques are recipes, x is the training
set size (data.train_size; null = the whole training set, derived as described in
`train_images`), and each recipe is compared with the plan's first recipe at the same x.

How to read the report, and its limits: docs/paths.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from scipy import stats

from stages import io as sio, params as P
from stages.errors import ParamsError
from stages.experiments import plan as plans, reports

METRICS = {  # the columns, and the MLflow metric each reads (fractions; shown in percent)
    "train": "final_train_accuracy",
    "validation": "final_val_accuracy",
    "test": "test_accuracy",
    "gap": "generalization_gap",  # train − test (stages/evaluate.py)
}
COLOURS = {"train": "tab:blue", "test": "tab:orange", "gap": "tab:red"}
CIFAR10_TRAIN_PER_CLASS = 5000  # the bundled and the official CIFAR-10: 10 classes × 5,000


Technique = plans.Technique


def exp_name(prefix: str, technique: str, point_label: str, seed: int) -> str:
    return plans.exp_name(prefix, f"{technique}-{point_label}", seed)


def baseline_name(prefix: str, seed: int) -> str:
    return plans.exp_name(prefix, "baseline", seed)


# --- reading the runs ------------------------------------------------------------------------


def train_images(run) -> int:
    """The training set size a run used. data.train_size when it is set; null is the whole
    training set, which train does not log: it is the CIFAR-10 training set (5,000 images per
    class) less each class's validation share, round(5,000 × data.val_fraction), exactly as
    stages/augment.py's stratified split holds it out. Other sources: give data.train_size."""
    p = run.data.params
    if p.get("data.train_size", "None") != "None":
        return int(p["data.train_size"])
    if p.get("data.source") not in (P.BUNDLED, "cifar10"):
        raise ParamsError(
            f"run {run.data.tags.get('dvc.exp_name')}: data.train_size is null and data.source "
            f"{p.get('data.source')!r} is not CIFAR-10, so its training set size is unknown: "
            "give data.train_size explicitly in the plan"
        )
    per_class = CIFAR10_TRAIN_PER_CLASS - round(
        CIFAR10_TRAIN_PER_CLASS * float(p["data.val_fraction"])
    )
    return 10 * per_class


def logged(text: str | None):
    """A param as MLflow logged it (text) back to its value: "1e-05" → 1e-05, "True" → True,
    "None" → None (YAML alone reads 1e-05 as a string: it wants a dot in the mantissa)."""
    value = yaml.safe_load(text) if text is not None else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def strength(run, param: str) -> float:
    """The x of a run: its logged value of `param` (not the one in its name)."""
    if param == "data.train_size":
        return float(train_images(run))
    if param not in run.data.params:
        raise ParamsError(f"run {run.data.tags.get('dvc.exp_name')} logged no param {param}")
    value = logged(run.data.params[param])
    return float(value) if value is not None else math.nan


@dataclass
class Point:
    """One strength of one technique: its runs by seed (seeds without a finished run left out)."""

    label: str
    x: float
    runs: dict  # seed -> MLflow run

    def values(self, key: str) -> dict[int, float]:
        """{seed: metric in percent}."""
        return {s: 100 * r.data.metrics[METRICS[key]] for s, r in self.runs.items()}

    def mean(self, key: str) -> float:
        return statistics.mean(self.values(key).values())

    def std(self, key: str) -> float:
        v = list(self.values(key).values())
        return statistics.stdev(v) if len(v) > 1 else 0.0


def collect(plan: plans.Plan, by_name: dict, prefix: str):
    """The baseline's Point (None without one) and, per technique, its Points with runs."""
    paths = {}
    for t in plan.techniques:
        points = []
        for point_label, _ in t.points:
            found = {
                s: by_name[exp_name(prefix, t.name, point_label, s)]
                for s in plan.seeds
                if exp_name(prefix, t.name, point_label, s) in by_name
            }
            if found:
                points.append(
                    Point(point_label, strength(next(iter(found.values())), t.param), found)
                )
        paths[t.name] = points
    names = {s: baseline_name(prefix, s) for s in plan.seeds}
    found = {s: by_name[n] for s, n in names.items() if n in by_name} if plan.baseline else {}
    baseline = Point("baseline", math.nan, found) if found else None
    return baseline, paths


# --- the statistics --------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """A paired difference over seeds, in points: its mean, the half-width of its 95% t-interval
    (None with one seed: no spread to estimate), and the seeds it paired."""

    mean: float
    half: float | None
    seeds: int

    def excludes_zero(self) -> bool:
        return self.half is not None and abs(self.mean) > self.half


def paired(point: Point, reference: Point, key: str) -> Difference | None:
    """point − reference seed by seed, over the seeds both have (None when they share none).
    The 95% interval is mean ± t(0.975, n − 1) · sd / √n, Student's t over the n differences."""
    a, b = point.values(key), reference.values(key)
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not diffs:
        return None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return Difference(mean, None, 1)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Difference(mean, stats.t.ppf(0.975, len(diffs) - 1) * sem, len(diffs))


def verdict(d: Difference | None) -> str:
    """From Δtest: helps or hurts when its interval excludes 0, else within noise."""
    if d is None:
        return "no shared seed"
    if d.half is None:
        return "— (one seed)"
    if not d.excludes_zero():
        return "within noise"
    return "helps" if d.mean > 0 else "hurts"


def compared_seeds(candidates: list[Point]) -> set[int]:
    """The seeds every candidate of a technique has (the baseline among them)."""
    return set.intersection(*(set(p.runs) for p in candidates))


def choose(points: list[Point], baseline: Point | None) -> Point:
    """The highest mean validation accuracy over the seeds every candidate has, the baseline
    included (first in a tie: no regularization unless a strength does better). Over the shared
    seeds, so that a strength run with one seed is not weighed against the baseline's mean over
    three, a different sample (a lucky seed would win); with none shared, each its own mean. The
    test set takes no part in it."""
    candidates = ([baseline] if baseline else []) + points
    seeds = compared_seeds(candidates)

    def validation(p: Point) -> float:
        values = p.values("validation")
        return statistics.mean(values[s] for s in seeds) if seeds else p.mean("validation")

    return max(candidates, key=validation)


def reference_for(
    point: Point, plan: plans.Plan, baseline: Point | None, paths: dict
) -> Point | None:
    """What a point is compared with: the baseline; in a learning curve (baseline: false), the
    plan's first recipe at the same x."""
    if plan.baseline:
        return baseline
    first = paths[plan.techniques[0].name]
    return next((p for p in first if p is not point and math.isclose(p.x, point.x)), None)


# --- the report ------------------------------------------------------------------------------


def _pm(point: Point, key: str, unit: str = "%") -> str:
    if len(point.runs) == 1:
        return f"{point.mean(key):.1f}{unit}"
    return f"{point.mean(key):.1f} ± {point.std(key):.1f}{unit}"


def _signed(value: float) -> str:
    return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _diff(d: Difference | None) -> str:
    if d is None:
        return "—"
    if d.half is None:
        return f"{_signed(d.mean)} pt [—]"
    return f"{_signed(d.mean)} pt [{_signed(d.mean - d.half)}, {_signed(d.mean + d.half)}]"


def _seeds(point: Point, seeds: tuple[int, ...]) -> str:
    missing = [f"s{s}" for s in seeds if s not in point.runs]
    return f"{len(point.runs)}" + (f" (no {', '.join(missing)})" if missing else "")


def shown(point: Point, t: Technique) -> str:
    """A point's strength as its runs logged it (its name's label only when that isn't a number)."""
    if point.label == "none" and t.param == "data.train_size":  # the whole training set
        return f"none ({point.x:g})"
    return f"{point.x:g}" if math.isfinite(point.x) else point.label


def regime_strength(plan: plans.Plan, t: Technique) -> str | None:
    """The regime's own strength of the technique's param, when the regime sets it (a path
    around a tuned recipe: its points go up and down from there); else None."""
    return plans.label(plan.regime[t.param]) if t.param in plan.regime else None


def baseline_label(plan: plans.Plan, t: Technique) -> str:
    """The baseline row of a technique: `none`, or the regime's own strength."""
    return f"baseline ({regime_strength(plan, t) or 'none'})"


def row_verdict(is_reference: bool, ref: Point | None, dtest: Difference | None) -> str:
    if is_reference:
        return "reference"
    return verdict(dtest) if ref else "no reference run"


def table(plan: plans.Plan, prefix: str, baseline: Point | None, paths: dict, chosen: dict) -> str:
    against = "the baseline" if plan.baseline else f"{plan.techniques[0].name} at the same x"
    lines = [
        f"# {prefix}: {'the regularization path' if plan.baseline else 'learning curves'} "
        f"(plan {plan.name})",
        "",
        f"Percent throughout: mean ± std over seeds. Δtest and Δgap: paired differences with "
        f"{against}, seed by seed (same seed = same split, subset and initialization), mean "
        "[95% t-interval over seeds]; verdict from Δtest: helps / hurts when its interval "
        "excludes 0, else within noise. "
        + (
            "✓ = chosen: the highest mean validation accuracy over the seeds every row of the "
            "technique has (the test set takes no part in the choice). "
            if plan.baseline
            else ""
        )
        + "Gap = train − test.",
    ]
    header = ["seeds", "train", "validation", "test", "gap", "Δtest", "Δgap", "verdict"]
    for t in plan.techniques:
        points = paths[t.name]
        if not points:  # not asked for in this pass, or not finished: not shown
            continue
        lines += ["", f"## {t.name} (`{t.param}`)", ""]
        x = "training images" if t.param == "data.train_size" else "strength"
        lines += ["| " + " | ".join([x, *header]) + " |", "|" + "---|" * (1 + len(header))]
        rows = ([baseline] if baseline else []) + points
        reference_path = None if plan.baseline else plan.techniques[0]
        for point in rows:
            is_baseline = point is baseline
            name = baseline_label(plan, t) if is_baseline else shown(point, t)
            ref = None if is_baseline else reference_for(point, plan, baseline, paths)
            dtest, dgap = (
                (paired(point, ref, "test"), paired(point, ref, "gap")) if ref else (None, None)
            )
            cells = [
                f"**{name} ✓**" if point is chosen[t.name] else name,
                _seeds(point, plan.seeds),
                _pm(point, "train"),
                _pm(point, "validation"),
                _pm(point, "test"),
                _pm(point, "gap", " pt"),
                _diff(dtest),
                _diff(dgap),
                row_verdict(is_baseline or t is reference_path, ref, dtest),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        best = chosen[t.name]
        lines.append("")
        if best is None:
            continue
        seeds = compared_seeds(rows)
        if seeds and any(set(p.runs) != seeds for p in rows):
            lines.append(
                f"Compared on seeds {', '.join(map(str, sorted(seeds)))}, which every row has."
            )
        if best is baseline:
            lines.append(
                "Chosen on validation: none of these strengths beats "
                + (
                    f"the regime's {t.param} = {strength}"
                    if (strength := regime_strength(plan, t))
                    else "no regularization"
                )
                + f" on validation (baseline: validation {best.mean('validation'):.1f}%, "
                f"test {best.mean('test'):.1f}%)."
            )
        else:
            lines.append(
                f"Chosen on validation: {t.param} = {shown(best, t)} (validation "
                f"{best.mean('validation'):.1f}%, test {best.mean('test'):.1f}%, "
                f"seeds {', '.join(map(str, sorted(best.runs)))})."
            )
    runs = len(baseline.runs if baseline else {}) + sum(
        len(p.runs) for points in paths.values() for p in points
    )
    return "\n".join([*lines, "", reports.RUNS_LINE.format(n=runs)]) + "\n"


def chosen_json(plan: plans.Plan, baseline: Point | None, chosen: dict) -> dict:
    out = {}
    for t in plan.techniques:
        best = chosen.get(t.name)
        if best is None:
            continue
        run = next(iter(best.runs.values()))
        value = logged(run.data.params.get(t.param))
        out[t.name] = {
            "param": t.param,
            "value": value,  # as logged (for the baseline: the regime's own value)
            "baseline": best is baseline,
            # every change of the point, to rerun it (early stopping's enabled: true, say)
            "changes": {} if best is baseline else dict(t.points)[best.label],
            "val_accuracy": round(best.mean("validation") / 100, 6),
            "test_accuracy": round(best.mean("test") / 100, 6),
            "seeds": sorted(best.runs),
        }
    return out


# --- the figures -----------------------------------------------------------------------------


def figure(
    t: Technique,
    points: list[Point],
    baseline: Point | None,
    best: Point,
    out: Path,
    reference: tuple[str, list[Point]] | None = None,
    baseline_name: str | None = None,
):
    """Train, test and gap against the strength, mean ± std over seeds, the baseline dashed
    (`baseline_name`: its label, when it is not "no <technique>"); in a learning curve, the
    reference recipe's (name, points) test accuracy in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))  # room for the legend on the right
    points = sorted(points, key=lambda p: p.x)
    xs = [p.x for p in points]
    lowest = 0.0
    for key in ("train", "test", "gap"):
        mean = [p.mean(key) for p in points]
        std = [p.std(key) for p in points]
        name = "gap (train − test)" if key == "gap" else f"{key} accuracy"
        ax.plot(xs, mean, "o-", color=COLOURS[key], label=name)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=COLOURS[key],
            alpha=0.2,
            lw=0,
        )
        lowest = min(lowest, *(m - s for m, s in zip(mean, std)))
        if baseline:
            ax.axhline(
                baseline.mean(key),
                color=COLOURS[key],
                ls="--",
                lw=1,
                label=f"{name}, {baseline_name or f'baseline (no {t.name})'}",
            )
            lowest = min(lowest, baseline.mean(key))
    if reference and reference[1]:
        name, ref_points = reference[0], sorted(reference[1], key=lambda p: p.x)
        ax.plot(
            [p.x for p in ref_points],
            [p.mean("test") for p in ref_points],
            "s--",
            color="grey",
            lw=1,
            label=f"test accuracy, {name} (reference)",
        )
    if best is not baseline:
        ax.axvline(best.x, color="black", ls=":", lw=1.2, label="chosen on validation")
        ax.plot(
            [best.x],
            [best.mean("test")],
            "*",
            color="black",
            ms=12,
            ls="none",
            label="its test accuracy",
        )
    if t.scale == "log":
        ax.set_xscale("log")
    # Honest axes: accuracy and gap on the whole 0-100% range (below 0 only for a negative gap),
    # so a difference of a point looks like one, not like a trend.
    ax.set_ylim(min(0, 10 * math.floor(lowest / 10)), 100)
    ax.set_yticks(range(int(min(0, 10 * math.floor(lowest / 10))), 101, 10))
    xlabel = "training images" if t.param == "data.train_size" else f"{t.param} ({t.scale} scale)"
    ax.set(xlabel=xlabel, ylabel="percent", title=f"{t.name}: accuracy and gap against {xlabel}")
    ax.grid(alpha=0.3)
    title = "mean ± std over seeds" + ("; dashed: baseline" if baseline else "")
    if best is not None and best is baseline:
        title += "\nchosen on validation: the baseline\n(no strength here beats it)"
    ax.legend(
        fontsize=8, title=title, title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5)
    )
    fig.tight_layout()
    sio.save_figure(out, fig)
    plt.close(fig)


def write_report(plan: plans.Plan, by_name: dict, prefix: str, out_dir: Path, force: bool = False):
    """The figures, the table and chosen.json of the runs `by_name` ({experiment name: a run with
    .data.params, .data.metrics and .data.tags as MLflow gives them}); returns the files written
    (the table and chosen.json last), the baseline's Point and the Points of each technique.
    Nothing is written when the table would hold less than the committed one (unless `force`)."""
    baseline, paths = collect(plan, by_name, prefix)
    if not any(paths.values()):
        raise ParamsError(f"no finished run of plan {plan.name!r} named {prefix}-...")
    # A learning curve's x is the data, not a strength to choose: nothing is chosen there.
    chosen = {
        t.name: choose(paths[t.name], baseline) if plan.baseline else None
        for t in plan.techniques
        if paths[t.name]
    }
    out_dir = Path(out_dir)
    report = out_dir / f"{prefix}-path.md"
    text = table(plan, prefix, baseline, paths, chosen)
    reports.check_not_less(report, text, force, keyed=True)
    files = []
    for t in plan.techniques:
        if paths[t.name]:
            files.append(out_dir / f"{prefix}-path-{t.name}.png")
            first = plan.techniques[0]
            reference = None if plan.baseline or t is first else (first.name, paths[first.name])
            baseline_name = baseline_label(plan, t) if regime_strength(plan, t) else None
            figure(t, paths[t.name], baseline, chosen[t.name], files[-1], reference, baseline_name)
    sio.write_text(report, text)
    sio.write_json(out_dir / f"{prefix}-chosen.json", chosen_json(plan, baseline, chosen))
    return [*files, report, out_dir / f"{prefix}-chosen.json"], baseline, paths


def build(
    plan: plans.Plan,
    prefix: str,
    out_dir: Path = Path("reports"),
    tracking_uri: str | None = None,
    experiment: str | None = None,
    force: bool = False,
    seeds=None,
) -> Path:
    """Figures, table and chosen.json of a path, logged to its MLflow parent run; returns the
    table's path. The runs of every seed of the plan, of `seeds` (a pass run with `--seeds`) and
    of any earlier pass (plans.seeds_run). `experiment` and `tracking_uri` default to
    params.yaml's (mlflow section)."""
    client, experiment_id, experiment, tracking_uri = reports.open_experiment(
        tracking_uri, experiment
    )
    if experiment_id is None:
        raise ParamsError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    by_name = reports.finished_runs(client, experiment_id, prefix)
    plan = replace(plan, seeds=tuple(plans.seeds_run(plan, prefix, by_name, seeds)))
    if not by_name:
        raise ParamsError(
            f"no finished run of plan {plan.name!r} named {prefix}-<technique>-<value>-s<seed> "
            f"in experiment {experiment!r} of {tracking_uri}"
        )
    files, baseline, paths = write_report(plan, by_name, prefix, out_dir, force)
    children = [
        r
        for p in [baseline, *(q for ps in paths.values() for q in ps)]
        if p
        for r in p.runs.values()
    ]
    reports.log_to_parent(client, experiment_id, prefix, plan.name, files, children)
    return files[-2]
