"""Sweep grids (stages/experiments/grids/<name>.yaml with `techniques`): read and checked.

The sweep command (sweep.py) queues their points; the report (path.py) reads their runs back.
Both read a grid through load() here, so they agree on its points and names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.errors import ParamsError
from stages.experiments import study

GRIDS_DIR = Path(__file__).parent / "grids"
GRID_KEYS = {"regime", "seeds", "baseline", "shared", "techniques"}  # shared: YAML anchors
TECHNIQUE_KEYS = {"param", "values", "points", "scale", "with"}


@dataclass(frozen=True)
class Sweep:
    """A sweep grid: the regime, the seeds, whether the regime alone is run as the baseline, and
    per technique its param and its points (each a mapping of params changes)."""

    name: str
    regime: dict
    seeds: tuple[int, ...]
    baseline: bool
    techniques: dict[str, tuple[str, list[dict]]]  # technique: (param, [changes of each point])
    scales: dict[str, str]  # technique: "log" or "linear", the x axis of its path's figure


def label(value) -> str:
    """A strength as it appears in experiment names: 1e-05, 0.0001, 0.5, 3, none, true."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


def load(name: str | Path) -> Sweep:
    """grids/<name>.yaml (or a path to a YAML file), its shape checked (one line naming the file
    and what is wrong)."""
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else GRIDS_DIR / f"{name}.yaml"
    data = study.read_grid(path, sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
    unknown = sorted(set(data) - GRID_KEYS)
    techniques = data.get("techniques")
    if unknown or not isinstance(techniques, dict) or not techniques:
        raise ParamsError(
            f"{path}: a sweep grid has {', '.join(sorted(GRID_KEYS))} and at least one technique"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    parsed = {}
    for technique, spec in techniques.items():
        where = f"{path}: technique {technique!r}"
        if not isinstance(spec, dict) or set(spec) - TECHNIQUE_KEYS or "param" not in spec:
            raise ParamsError(f"{where}: expected {{param, values | points, scale, with}}")
        if ("values" in spec) == ("points" in spec):
            raise ParamsError(f"{where}: give either values or points, not both or neither")
        if spec.get("scale", "linear") not in ("log", "linear"):
            raise ParamsError(f"{where}: scale is log or linear, not {spec['scale']!r}")
        param, common = spec["param"], spec.get("with") or {}
        if "values" in spec:
            points = [{**common, param: v} for v in spec["values"] or []]
        else:
            points = [{**common, **(p or {})} for p in spec["points"] or []]
            if any(param not in p for p in points):
                raise ParamsError(f"{where}: every point must set {param} (its x)")
        if not points:
            raise ParamsError(f"{where}: no values (an empty list)")
        parsed[technique] = (param, points)
    seeds = tuple(data.get("seeds") or (0, 1, 2))
    scales = {t: spec.get("scale", "linear") for t, spec in techniques.items()}
    return Sweep(
        path.stem, data.get("regime") or {}, seeds, data.get("baseline", True), parsed, scales
    )
