# make install: .venv with everything pinned in requirements.lock (idempotent)
# make run:     install, then the whole pipeline (dvc repro)
# make test:    install, then the test suite
# make bench:   epoch speed of the source's loop, the pipeline and pure compute
# make preset:  a named set of params as one DVC experiment (make preset PRESET=fast-gpu)
# make study:   the regularization study as queued DVC experiments, then its table
#               (e.g. make study STUDY_ARGS="--source ../shared/data/cifar10-jpg.tar.gz")
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DVC runs each stage as `python -m stages.<name>`: that python must be the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# No network access but the data download: no usage telemetry from MLflow.
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install run test study bench preset lock clean-venv

install: $(STAMP)

$(STAMP): requirements.lock
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

run: install
	dvc repro

test: install
	$(PYTHON) -m pytest

STUDY_ARGS ?=
study: install
	python -m stages.study run $(STUDY_ARGS)

PRESET ?= fast-gpu
preset: install
	python -m stages.preset $(PRESET)

# Epoch speed: the source's loop vs the pipeline vs pure compute (reports/benchmark.{json,md})
bench: install
	python benchmarks/bench.py
	python benchmarks/threads.py
	python benchmarks/compile.py

# Re-pin after changing pyproject.toml's dependencies. CUDA wheels are left to torch's own pins,
# so that the lock also installs where they don't exist.
lock:
	$(PYTHON) -m pip install --quiet -e '.[test]'
	$(PYTHON) -m pip freeze --exclude-editable | grep -viE '^(nvidia-|cuda-|triton==)' > requirements.lock

clean-venv:
	rm -rf $(VENV)
