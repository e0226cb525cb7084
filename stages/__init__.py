"""The pipeline: five DVC stages (check, download, augment, train, evaluate), the basics they
share (params, io, errors, runtime, data, regularize), and the rooms networks/, tracking/ and
experiments/."""

import os

# PyTorch's OpenMP threads (libgomp) spin for a while before they sleep when they wait for the
# next parallel region. Two trainings on the same cores then spend their time spinning against
# each other instead of computing. A short spin (1,000 rounds instead of 300,000) keeps two at once
# near a fair share and a training alone at its speed; sleeping at once (OMP_WAIT_POLICY=PASSIVE)
# slows a training alone (docs/speed.md, "A shared machine"). It must be set before torch loads:
# every stage imports this package first (`python -m stages.train`). A value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
