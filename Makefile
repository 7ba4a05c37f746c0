# SparseGrad: the method as a library and the reproduction suite.
#   make test              create .venv, fetch the offline assets, run the tests
#   make reproduce-glue    the main job (PROFILE=default|smoke|paper|paper_best|llama; FRESH=1 runs it all
#                          again into results/local/<profile>, RESULTS=results/local resumes that;
#                          LAUNCHER=parallel|slurm|slurm_local JOBS=N runs N trials at once through that launcher)
# Everything runs inside .venv at the repository root; it is rebuilt only when
# pyproject.toml or constraints.txt change.

SHELL := /bin/bash
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PROFILE ?= default
REPRODUCE_FLAGS = $(if $(FRESH),--fresh) $(if $(RESULTS),--results $(RESULTS)) \
	$(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(JOBS),--jobs $(JOBS))
# The Hub is not needed for anything the Makefile runs by default; without these flags every
# Hub look-up retries for 20-50 s before failing. W&B never blocks on a login.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help venv install assets test test-fast lint format reproduce-glue tables bench bench-layer clean

help:
	@sed -n '2,7p' Makefile

venv install: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulled in by any package resolves to a
# multi-GB CUDA build. Then the package with its dev, postgres (the PostgreSQL driver, for the shared-study
# tests), integrations (TRL) and dashboard (optuna-dashboard) extras, against the resolved lock file.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev,postgres,integrations,dashboard]'
	@# an older venv still holds the hydra-optuna-sweeper plugin (optuna < 3), which clashes with ours
	@$(PIP) uninstall --quiet -y hydra-optuna-sweeper 2>/dev/null || true
	@touch $(STAMP)

assets: $(STAMP)
	$(PY) -m scripts.fetch_assets

test: assets
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

format: $(STAMP)
	$(PY) -m ruff check --fix .

reproduce-glue: assets
	$(PY) -m scripts.reproduce_glue --profile $(PROFILE) $(REPRODUCE_FLAGS)

tables: $(STAMP)
	$(PY) -m scripts.reproduce_glue --profile $(PROFILE) --tables-only $(if $(RESULTS),--results $(RESULTS))

# make bench BENCH_ARGS="--preset bf16": SmolLM2 loaded in bf16, every method with its master copies
bench: assets
	$(PY) -m experiments.benchmark $(BENCH_ARGS)
	$(PY) -m benchmarks.ddp

bench-layer: $(STAMP)
	$(PY) -m experiments.bench_layer

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
