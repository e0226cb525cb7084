"""Plans of experiments (stages/experiments/plans/<name>.yaml): read, checked, expanded, named.

A plan is the `regime` every experiment starts from, the `seeds`, and one of

- `rows`: a study, each row a set of params changes (dotted as in `dvc exp run -S`);
- `techniques`: a regularization path, each technique one param at several strengths
  ({param, values | points, scale, with}); shorthand that expands into rows named
  `<technique>-<strength>`, plus the regime alone as the row `baseline` (unless `baseline: false`:
  a learning curve, where x is data.train_size and the first technique is the reference);
- `space`: a search, each param a distribution ({log_uniform | uniform: [low, high]},
  {int: [low, high]}, {categorical: [choices]}), optionally only `when` other params of the
  space have given values; `search` holds its sampler seed, its pruner, the epochs a trial
  runs at least before it may be pruned, the seeds its best recipe is rerun with, and optionally
  a `target` ({val_accuracy, epochs}: what another way reached, and the epochs it spent) that
  the report measures the search against, a `path` (a plan whose regularization path shares
  the regime) whose choices the report shows beside the best trial's, and a `first` point
  ({param of the space: value}; the rest drawn) that a new study tries before it draws any:
  what a smaller study found, say, so that a short search starts from it.

`shared:` holds YAML anchors that rows or techniques merge in; `prefix:` the experiments' names
(default: the plan's name); `report:` a study's table file under reports/ (default:
<prefix>-<plan>.md). Every experiment is the committed params.yaml + the regime + its row
(or sampled point) + its seed (+ --set over all), named `<prefix>-<row>-s<seed>` (a search's
trials: `<prefix>-t<number>`). Every row, every point and both ends of every distribution are
checked against the params schema here, before anything is queued.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages import params as P
from stages.errors import ParamsError

PLANS_DIR = Path(__file__).parent / "plans"
KINDS = ("rows", "techniques", "space")
PLAN_KEYS = {"regime", "seeds", "shared", "prefix", "report", "baseline", "search", *KINDS}
TECHNIQUE_KEYS = {"param", "values", "points", "scale", "with"}
DISTRIBUTIONS = ("log_uniform", "uniform", "int", "categorical")
SEARCH_KEYS = {"seed", "pruner", "min_epochs", "seeds_of_the_best", "target", "path", "first"}
TARGET_KEYS = {"val_accuracy", "epochs"}  # search.target: a validation accuracy to reach, and
# the epochs another way spent reaching it (the report says when the search got there)
PRUNERS = ("hyperband", "halving", "none")


@dataclass(frozen=True)
class Technique:
    """One path of a `techniques` plan: `param` at each point (label in names, changes)."""

    name: str
    param: str
    scale: str  # "log" or "linear": the x axis of its figure
    points: tuple[tuple[str, dict], ...]


@dataclass(frozen=True)
class Dimension:
    """One param of a search space: its distribution, and when it is sampled at all."""

    param: str
    kind: str  # one of DISTRIBUTIONS
    args: tuple  # (low, high) or the choices
    when: dict = field(default_factory=dict)  # {other param of the space: the value it needs}


@dataclass(frozen=True)
class Plan:
    name: str
    kind: str  # "rows", "techniques" or "space"
    prefix: str
    regime: dict
    seeds: tuple[int, ...]
    rows: dict[str, dict]  # every experiment's own changes, by row name (a path's expanded)
    baseline: bool = True  # a path: the regime alone is the row `baseline`
    techniques: tuple[Technique, ...] = ()
    space: tuple[Dimension, ...] = ()
    search: dict = field(default_factory=dict)
    report: str | None = None  # a study's table under its own prefix: reports/<this>


def names() -> list[str]:
    return sorted(p.stem for p in PLANS_DIR.glob("*.yaml"))


def label(value) -> str:
    """A strength as it appears in experiment names: 1e-05, 0.0001, 0.5, 3, none, true."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


def exp_name(prefix: str, row: str, seed: int) -> str:
    return f"{prefix}-{row}-s{seed}"


def seeds_run(plan: Plan, prefix: str, names, seeds=()) -> list[int]:
    """The seeds a report of the plan covers: the plan's, a pass's `--seeds`, and every seed that
    any pass ran for one of the plan's rows under the prefix (`<prefix>-<row>-s<seed>` among
    `names`), so that a later pass with the plan's own seeds keeps the earlier passes' others."""
    rows = "|".join(re.escape(row) for row in plan.rows)
    pattern = re.compile(rf"{re.escape(prefix)}-(?:{rows})-s(\d+)")
    ran = {int(m[1]) for name in names if (m := pattern.fullmatch(name))}
    return sorted(set(plan.seeds) | set(seeds or ()) | ran)


def trial_name(prefix: str, number: int) -> str:
    return f"{prefix}-t{number}"


def plan_path(name: str | Path) -> Path:
    """plans/<name>.yaml, or a path to a YAML file."""
    return Path(name) if str(name).endswith((".yaml", ".yml")) else PLANS_DIR / f"{name}.yaml"


def read(path: Path) -> dict:
    """A plan file's YAML, or one line saying why not."""
    if not path.exists():
        raise ParamsError(f"no plan {path.stem!r} (known: {', '.join(names())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: a plan is a mapping ({', '.join(sorted(PLAN_KEYS))})")
    return data


def load(name: str | Path, base: dict | None = None) -> Plan:
    """The plan, its shape checked and every row, point and distribution checked against the
    params schema on top of `base` (params.yaml by default): one line naming the file and what
    is wrong, before anything is queued."""
    path = plan_path(name)
    data = read(path)
    unknown = sorted(set(data) - PLAN_KEYS)
    kinds = [k for k in KINDS if k in data]
    if unknown or len(kinds) != 1:
        raise ParamsError(
            f"{path}: a plan has regime, seeds and one of rows, techniques or space"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            + (f" (it has {' and '.join(kinds)})" if len(kinds) > 1 else "")
        )
    kind, regime = kinds[0], data.get("regime") or {}
    seeds = tuple(data.get("seeds") or (0, 1, 2))
    prefix = str(data.get("prefix") or path.stem)
    base = P.read_yaml() if base is None else base
    if kind == "rows":
        rows = _rows(path, data["rows"])
        plan = Plan(path.stem, kind, prefix, regime, seeds, rows, report=data.get("report"))
    elif kind == "techniques":
        techniques = _techniques(path, data["techniques"])
        baseline = bool(data.get("baseline", True))
        rows = {"baseline": {}} if baseline else {}
        for t in techniques:
            rows.update({f"{t.name}-{point_label}": changes for point_label, changes in t.points})
        plan = Plan(path.stem, kind, prefix, regime, seeds, rows, baseline, techniques)
    else:
        space = _space(path, data["space"])
        search = _search(path, data.get("search") or {})
        _first_point(path, space, search.get("first"))
        plan = Plan(path.stem, kind, prefix, regime, seeds, {}, space=space, search=search)
    for row, changes in plan.rows.items():
        check(base, {**regime, **changes}, f"{path}: row {row!r}")
    for changes in corners(plan.space):
        check(base, {**regime, **changes}, f"{path}: space")
    if plan.search.get("first"):
        check(base, {**regime, **plan.search["first"]}, f"{path}: search.first")
    return plan


def _rows(path: Path, rows) -> dict[str, dict]:
    if not isinstance(rows, dict) or not rows:
        raise ParamsError(f"{path}: at least one row under rows")
    for row, changes in rows.items():
        if changes is not None and not isinstance(changes, dict):
            raise ParamsError(f"{path}: row {row!r} must map params to values, got {changes!r}")
    return {row: changes or {} for row, changes in rows.items()}


def _techniques(path: Path, techniques) -> tuple[Technique, ...]:
    if not isinstance(techniques, dict) or not techniques:
        raise ParamsError(f"{path}: at least one technique under techniques")
    parsed = []
    for name, spec in techniques.items():
        where = f"{path}: technique {name!r}"
        if not isinstance(spec, dict) or set(spec) - TECHNIQUE_KEYS or "param" not in spec:
            raise ParamsError(f"{where}: expected {{param, values | points, scale, with}}")
        if ("values" in spec) == ("points" in spec):
            raise ParamsError(f"{where}: give either values or points, not both or neither")
        scale = spec.get("scale", "linear")
        if scale not in ("log", "linear"):
            raise ParamsError(f"{where}: scale is log or linear, not {scale!r}")
        param, common = spec["param"], spec.get("with") or {}
        if "values" in spec:
            points = [{**common, param: v} for v in spec["values"] or []]
        else:
            points = [{**common, **(p or {})} for p in spec["points"] or []]
            if any(param not in p for p in points):
                raise ParamsError(f"{where}: every point must set {param} (its x)")
        if not points:
            raise ParamsError(f"{where}: no values (an empty list)")
        parsed.append(Technique(name, param, scale, tuple((label(p[param]), p) for p in points)))
    return tuple(parsed)


def _space(path: Path, space) -> tuple[Dimension, ...]:
    if not isinstance(space, dict) or not space:
        raise ParamsError(f"{path}: an empty search space (space: param → distribution)")
    dims = []
    for param, spec in space.items():
        where = f"{path}: space {param!r}"
        spec = dict(spec) if isinstance(spec, dict) else {}
        when = spec.pop("when", None) or {}
        kinds = [k for k in DISTRIBUTIONS if k in spec]
        if len(kinds) != 1 or set(spec) - set(DISTRIBUTIONS):
            raise ParamsError(
                f"{where}: expected one of {', '.join(DISTRIBUTIONS)} (and optionally when)"
            )
        kind, args = kinds[0], spec[kinds[0]]
        if not isinstance(args, list) or not args:
            raise ParamsError(f"{where}: {kind} takes a list")
        if kind != "categorical":
            if len(args) != 2 or not all(_number(a) for a in args) or not args[0] < args[1]:
                raise ParamsError(f"{where}: {kind} takes [low, high] with low < high")
            if kind == "log_uniform" and args[0] <= 0:
                raise ParamsError(f"{where}: log_uniform needs low > 0")
            if kind == "int" and not all(isinstance(a, int) for a in args):
                raise ParamsError(f"{where}: int takes whole numbers")
        if not isinstance(when, dict) or any(k not in space for k in when):
            raise ParamsError(f"{where}: when names params of the space and their values")
        dims.append(Dimension(param, kind, tuple(args), dict(when)))
    return tuple(dims)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _search(path: Path, search: dict) -> dict:
    unknown = sorted(set(search) - SEARCH_KEYS)
    if unknown:
        raise ParamsError(
            f"{path}: search has {', '.join(sorted(SEARCH_KEYS))} (unknown: {unknown})"
        )
    settings = {"seed": 0, "pruner": "hyperband", "min_epochs": 1, "seeds_of_the_best": [0, 1, 2]}
    settings.update(search)
    if settings["pruner"] not in PRUNERS:
        raise ParamsError(f"{path}: search.pruner is one of {', '.join(PRUNERS)}")
    target = settings.get("target")
    if target is not None and (
        not isinstance(target, dict)
        or set(target) != TARGET_KEYS
        or not (_number(target["val_accuracy"]) and 0 < target["val_accuracy"] <= 1)
        or not (isinstance(target["epochs"], int) and target["epochs"] > 0)
    ):
        raise ParamsError(
            f"{path}: search.target is {{val_accuracy: a fraction in (0, 1], epochs: a count}}, "
            f"not {target!r}"
        )
    if "path" in settings and settings["path"] not in names():
        raise ParamsError(
            f"{path}: search.path names a plan ({', '.join(names())}), not {settings['path']!r}"
        )
    return settings


def _first_point(path: Path, space: tuple[Dimension, ...], first) -> None:
    """search.first: params of the space, each inside its distribution."""
    if first is None:
        return
    where = f"{path}: search.first"
    if not isinstance(first, dict) or not first:
        raise ParamsError(f"{where} maps params of the space to values, not {first!r}")
    dims = {d.param: d for d in space}
    for param, value in first.items():
        d = dims.get(param)
        if d is None:
            raise ParamsError(f"{where}: {param!r} is not in the space ({', '.join(dims)})")
        if d.kind == "categorical":
            inside = value in d.args
        else:
            inside = _number(value) and d.args[0] <= value <= d.args[1]
            inside = inside and (d.kind != "int" or isinstance(value, int))
        if not inside:
            raise ParamsError(
                f"{where}: {param} = {value!r} is outside its {d.kind} {list(d.args)}"
            )


def corners(space: tuple[Dimension, ...]) -> list[dict]:
    """Points that together test every end of every distribution and every choice: the schema
    must accept each (a dropout searched up to 1.5 fails here, at 1.5). Each dimension is tried
    with the others at their first value, its `when` conditions met."""
    if not space:
        return []
    first = {d.param: d.args[0] for d in space}
    points = []
    for d in space:
        for value in d.args if d.kind == "categorical" else (d.args[0], d.args[1]):
            points.append({**first, **d.when, d.param: value})
    return points


def check(base: dict, changes: dict, where: str) -> None:
    try:
        P.parse(P.with_changes(base, changes))
    except ParamsError as exc:
        raise ParamsError(f"{where}: {exc}") from None


def select(plan: Plan, chosen: str | None) -> list[str]:
    """The rows (of a study) or techniques (of a path) named in `chosen` (comma-separated;
    default: all), in the plan's order."""
    if plan.kind == "space":
        if chosen:
            raise ParamsError(f"plan {plan.name!r} is a search: it has no rows or techniques")
        return []
    available = list(plan.rows) if plan.kind == "rows" else [t.name for t in plan.techniques]
    names_ = chosen.split(",") if chosen else available
    unknown = [n for n in names_ if n not in available]
    if unknown:
        what = "row" if plan.kind == "rows" else "technique"
        raise ParamsError(
            f"unknown {what} {', '.join(unknown)}; the plan has: {', '.join(available)}"
        )
    return names_


def experiments(
    plan: Plan,
    chosen: list[str],
    seeds: list[int],
    prefix: str,
    extra: dict | None = None,
    base: dict | None = None,
) -> list[tuple[str, dict]]:
    """(name, params changes) of every experiment of the chosen rows or techniques (a path's
    baseline with them), seed by seed so that a queue cut short leaves every row with the same
    seeds; each checked on top of `base` (the committed params.yaml) with `extra` over it."""
    if plan.kind == "techniques":
        rows = ["baseline"] if plan.baseline else []
        for t in plan.techniques:
            if t.name in chosen:
                rows += [f"{t.name}-{point_label}" for point_label, _ in t.points]
    else:
        rows = chosen
    base = P.read_yaml() if base is None else base
    todo = []
    for seed in seeds:
        for row in rows:
            name = exp_name(prefix, row, seed)
            changes = {**plan.regime, **plan.rows[row], "seed": seed, **(extra or {})}
            check(base, changes, name)
            todo.append((name, changes))
    return todo


def parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE items as changes, the values read as params.yaml reads them."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(value)  # as in params.yaml: 5 → int, null → None
    return extra


def check_committed_params(path: Path = P.PARAMS_FILE) -> None:
    """Every experiment is built from the committed params.yaml: refuse to start while the
    workspace's differs from it (a `dvc exp run -S` leaves its values there), naming the keys."""
    try:
        committed = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    except OSError:
        return  # no git on this machine (a bare GPU machine): nothing to compare with
    if committed.returncode != 0:
        return  # not in git (yet): nothing to compare with
    old = P.flatten_dict(yaml.safe_load(committed.stdout) or {})
    new = P.flatten_dict(P.read_yaml(path))
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>")
    )
    if changed:
        shown = ", ".join(f"{k}={new.get(k, '<absent>')!r}" for k in changed[:5])
        raise ParamsError(
            f"params.yaml has uncommitted changes ({shown}"
            f"{', …' if len(changed) > 5 else ''}), which every experiment would "
            "inherit: commit them, or `git checkout params.yaml`"
        )
