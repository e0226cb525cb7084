"""Run a preset, a named set of params.yaml changes, as one DVC experiment.

    python -m stages.experiments.preset fast-gpu [--queue] [-S key=value ...]

A preset is stages/experiments/presets/<name>.yaml: params.yaml keys in dotted form with their values. It
becomes `dvc exp run -n <name> -S key=value ...`, so the run is an ordinary DVC experiment and
MLflow run; extra `-S` options go after the preset's and win.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from stages import params as P
from stages.errors import ParamsError

PRESETS = Path(__file__).parent / "presets"


def load(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ParamsError(f"no preset {name!r} (known: {known})")
    return yaml.safe_load(path.read_text())


def command(name: str, overrides: dict, queue: bool, extra: list[str]) -> list[str]:
    cmd = ["dvc", "exp", "run", "-n", name] + (["--queue"] if queue else [])
    return cmd + P.set_options(overrides) + [arg for item in extra for arg in ("-S", item)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    parser.add_argument("-S", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        overrides = load(args.name)
        # A wrong key in the preset fails here, before DVC runs.
        P.parse(P.with_changes(P.read_yaml(), overrides))
    except ParamsError as exc:
        sys.exit(f"error (preset): {exc}")
    sys.exit(subprocess.run(command(args.name, overrides, args.queue, args.extra)).returncode)


if __name__ == "__main__":
    main()
