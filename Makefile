# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv if needed, installs the package, fetches Fashion-MNIST if needed,
#               and runs the default experiment (`gsgd train`)
#   make test   creates .venv if needed and runs the fast test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gsgd-installed
PYTEST_ARGS ?=

.PHONY: help setup run data test test-slow test-gpu test-all bench inspect-table5 clean

help:
	@echo "make run        set up (once) and run the default experiment"
	@echo "make test       set up (once) and run the fast tests (not slow, not gpu)"
	@echo "make test-slow  run the slow tests"
	@echo "make test-gpu   run the CUDA tests (skipped without a GPU)"
	@echo "make bench      time SGD vs G-SGD steps (scripts/bench_step.py)"
	@echo "make clean      remove the virtual environment and caches"

$(STAMP): setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,joblib,slurm]'
	@touch $(STAMP)

setup: $(STAMP)

data: setup
	@$(PY) -m gsgd_cli.data.fetch fashion_mnist

run: setup data
	$(VENV)/bin/gsgd train

test: setup
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -m "gpu" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
