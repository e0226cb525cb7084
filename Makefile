# make install: .venv with everything pinned in requirements.lock (idempotent)
# make run:     install, then the whole pipeline (dvc repro) on the bundled CIFAR-10, then where
#               its results are and the command that opens the MLflow UI on them
# make test:    install, then the test suite, its files shared between two pytest processes
#               (PYTEST_ARGS= runs it in one; PYTEST_ARGS="-n 4" on a bigger machine)
# make lint:    ruff's linter and formatter check (pinned in requirements.lock); make format fixes
# make bench:   epoch speed of the source's loop, the pipeline and pure compute; stage start-up;
#               the cost around each experiment and the queue's throughput
# make preset:  a named set of params as one DVC experiment (make preset PRESET=fast-gpu)
# make study:   the regularization study (plans/regularization.yaml) as queued DVC experiments
#               (JOBS workers, default 2), then its table (e.g. make study STUDY_ARGS="--seeds 0,1")
# make sweep:   each technique of plans/sweep.yaml at a range of strengths (JOBS workers, default
#               2), then its report (e.g. make sweep JOBS=1 SWEEP_ARGS="--shard 1/3")
# make search:  a joint search with pruning (e.g. make search SEARCH_ARGS="--grid joint --trials 200");
#               make optuna-dashboard: its live view (docs/experiments.md#plans-studies-paths-and-searches-one-command)
# make train-ddp NPROC=2:  the train stage as N data-parallel processes (torchrun; gloo on CPUs)
# make mlflow-server:      a team tracking server on PostgreSQL, on loopback (docs/scaling-out.md)
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest-xdist: the suite's files on two processes, each file's tests in order on one of them.
PYTEST_ARGS ?= -n 2 --dist loadfile
# DVC runs each stage as `python -m stages.<name>`: that python must be the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# No network access but the data download: no usage telemetry from MLflow.
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install run test lint format study sweep search optuna-dashboard bench preset lock clean-venv train-ddp mlflow-server

install: $(STAMP)

$(STAMP): requirements.lock
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

run: install
	dvc repro
	python -m stages.tracking.summary

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

# Queue workers of make study and make sweep (a --jobs in STUDY_ARGS / SWEEP_ARGS wins).
JOBS ?= 2
STUDY_ARGS ?=
study: install
	python -m stages.experiments.engine run --grid regularization --jobs $(JOBS) $(STUDY_ARGS)

SWEEP_ARGS ?=
sweep: install
	python -m stages.experiments.engine run --grid sweep --jobs $(JOBS) $(SWEEP_ARGS)

SEARCH_ARGS ?= --grid joint --trials 200
search: install
	python -m stages.experiments.engine run --jobs $(JOBS) $(SEARCH_ARGS)

# The searches' Optuna storage, live, on 127.0.0.1:8080 (STORAGE: another --storage URL).
STORAGE ?= sqlite:///$(CURDIR)/optuna.db
optuna-dashboard: install
	optuna-dashboard "$(STORAGE)" --host 127.0.0.1 --port 8080

PRESET ?= fast-gpu
preset: install
	python -m stages.experiments.preset $(PRESET)

# Distributed data-parallel training of the prepared data (after `make run` or `dvc repro augment`).
# Through DVC instead: dvc exp run -S train.nproc=2
NPROC ?= 2
train-ddp: install
	torchrun --standalone --nproc-per-node $(NPROC) -m stages.train

# mlflow server + PostgreSQL in data/tracking-server, on 127.0.0.1:5000. Options, e.g.
# make mlflow-server SERVER_ARGS="--auth --host 0.0.0.0 --allowed-hosts mlflow.example.com"
SERVER_ARGS ?=
mlflow-server: install
	python -m stages.tracking.server $(SERVER_ARGS)

# Epoch speed: the source's loop vs the pipeline vs pure compute (reports/benchmark.{json,md}),
# EfficientNet-Lite0 at 64-224 px, the cached linear probe and partial fine-tuning of its last
# 1, 2, 4, 6 blocks at 224 px on the cache (reports/benchmark_lite0.{json,md}),
# then the cost around each `dvc exp run` and the queue's throughput with 1 and 2 workers
# (benchmarks/overhead.py: reports/overhead.{json,md}; about 15 minutes), on the bundled CIFAR-10
# unless BENCH_DATA (a data.source) and BENCH_SHA256 (its data.sha256) say otherwise.
BENCH_DATA   ?= datasets/cifar10-jpg.tar.gz
BENCH_SHA256 ?= 097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297
bench: install
	python benchmarks/bench.py
	python benchmarks/bench.py --lite0 --images 500
	python benchmarks/threads.py
	python benchmarks/compile.py
	python benchmarks/overhead.py all --source "$(BENCH_DATA)" --sha256 "$(BENCH_SHA256)"

# Re-pin after changing pyproject.toml's dependencies. CUDA wheels are left to torch's own pins,
# so that the lock also installs where they don't exist.
lock:
	$(PYTHON) -m pip install --quiet -e '.[test]'
	$(PYTHON) -m pip freeze --exclude-editable | grep -viE '^(nvidia-|cuda-|triton==)' > requirements.lock

clean-venv:
	rm -rf $(VENV)
