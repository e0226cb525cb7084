"""The pipeline: five DVC stages (check, download, augment, train, evaluate), the basics they
share (params, io, errors, runtime, data, regularize), and the rooms networks/, tracking/ and
experiments/."""
