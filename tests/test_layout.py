"""The house's structure, read from the source with `ast` (nothing is imported or run):
no import cycle in stages/, basics below networks/tracking/experiments, no stage importing a
tool, and dvc.yaml's code deps equal to each stage's import closure."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ["check", "download", "augment", "train", "evaluate"]
BASICS = ["params", "io", "errors", "runtime", "data", "regularize", "averaging", "sam"]
ROOMS = ["networks", "tracking", "experiments"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def with_packages(name: str) -> list[str]:
    """Importing stages.a.b runs stages/__init__.py and stages/a/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_of(path: Path) -> set[str]:
    """The stages.* modules a file imports anywhere in it (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from stages.x import y`: y is a submodule or a name in stages.x
            names = [
                f"{node.module}.{a.name}" if module_path(f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "stages" and module_path(name):
                found.update(n for n in with_packages(name) if module_path(n))
    found.discard(module_name(path))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((REPO / "stages").rglob("*.py"))}


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [*with_packages(start)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_cycle_detection_works(monkeypatch):
    """The cycle test itself: a graph with a circle fails it."""
    monkeypatch.setattr(__import__(__name__), "graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "a -> b -> c -> a" in str(exc)
    else:
        raise AssertionError("a cycle went unnoticed")


# The one module of a room that the basics may read: the networks' registry, which params.py
# reads for the names and input sizes, imports no network code (test below).
READ_BY_BASICS = {"stages.networks", "stages.networks.registry"}


def test_layering():
    edges = graph()
    for basic in BASICS:
        above = {
            m
            for m in edges[f"stages.{basic}"] - READ_BY_BASICS
            if m.split(".")[1:2] and m.split(".")[1] in ROOMS
        }
        assert not above, f"basic module stages.{basic} imports {sorted(above)}"
    for stage in STAGES:
        tools = {m for m in closure(f"stages.{stage}", edges) if m.startswith("stages.experiments")}
        assert not tools, f"stage {stage} imports the tools {sorted(tools)}"
    for room in ["networks", "tracking"]:
        tools = {
            m
            for m in edges
            if m.startswith(f"stages.{room}")
            for t in edges[m]
            if t.startswith("stages.experiments")
        }
        assert not tools, f"stages.{room} imports a tool"


def test_top_level_holds_the_stages_and_the_basics():
    top = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert top == set(STAGES) | set(BASICS), sorted(top ^ (set(STAGES) | set(BASICS)))
    assert {
        p.name for p in (REPO / "stages").iterdir() if p.is_dir() and p.name != "__pycache__"
    } == set(ROOMS)


def test_dvc_code_deps_are_the_import_closure():
    """A module a stage imports but doesn't declare would let DVC reuse a stale output; one it
    declares but doesn't import reruns it for nothing."""
    edges = graph()
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        declared = {d for d in pipeline[stage]["deps"] if d.startswith("stages/")}
        needed = {str(module_path(m).relative_to(REPO)) for m in closure(f"stages.{stage}", edges)}
        assert declared == needed, (
            f"dvc.yaml stage {stage}: missing {sorted(needed - declared)}, "
            f"not imported {sorted(declared - needed)}"
        )


def test_dvc_params_are_what_the_results_depend_on():
    """Every key of params.yaml is a DVC param of a stage that acts on it, but for the keys that
    say only where a run is logged or how it is computed (params.NOT_RESULT_KEYS): those are
    params of no stage but check, which validates the whole file, so changing them reruns
    nothing."""
    from stages import params as P

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def under(key: str, names) -> bool:
        return any(key == n or key.startswith(n + ".") for n in names)

    def params_of(stage: str) -> list[str]:
        return [p for p in pipeline[stage].get("params", []) if isinstance(p, str)]

    keys = P.flatten(P.Params())
    not_results = [k for k in keys if under(k, P.NOT_RESULT_KEYS)]
    assert len(not_results) >= len(P.NOT_RESULT_KEYS), "NOT_RESULT_KEYS names unknown keys"
    for key in keys:
        stages = [s for s in STAGES if s != "check" and under(key, params_of(s))]
        if key in not_results:
            assert not stages, f"{key} changes no result, but is a param of {stages}"
        else:
            assert stages, f"{key} is a param of no stage: changing it would rerun nothing"


def test_the_registry_imports_no_network_code_and_the_stages_that_build_do():
    """registry.py reaches each definition through _defined_in("<module>") (importlib, unseen by
    the import graph), so that params.py, and with it the check, download and augment stages,
    depend on no network code; every module named so must be in the import closure of train and
    evaluate, or DVC would not rerun them when it changes."""
    edges = graph()
    assert edges["stages.networks.registry"] <= {"stages", "stages.networks"}
    source = ast.parse((REPO / "stages/networks/registry.py").read_text())
    named = {
        f"stages.networks.{node.args[0].value}"
        for node in ast.walk(source)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "_defined_in"
        and isinstance(node.args[0], ast.Constant)
    }
    assert "stages.networks.small" in named
    for stage in ("train", "evaluate"):
        missing = named - closure(f"stages.{stage}", edges)
        assert not missing, f"stage {stage} builds networks from {sorted(missing)} unimported"
