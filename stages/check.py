"""Stage `check`: validate params.yaml before any other stage may run.

Reads params: all of params.yaml. Writes data/params.ok.

DVC deletes a stage's outputs before running it, so a stage that only noticed a typo in its own
params would already have lost its previous outputs. Every stage therefore depends on this one's
marker file: DVC runs `check` first whenever params.yaml changes, and stops there on an error. The
marker's content never changes, so a passing check never makes another stage rerun.
"""

from __future__ import annotations

from pathlib import Path

from stages import errors, io as sio, params as P

OUT = Path("data/params.ok")


def main() -> None:
    P.load()
    sio.write_text(OUT, "params.yaml passed stages/params.py\n")


if __name__ == "__main__":
    errors.run(main)
