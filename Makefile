# The two commands a user needs: `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup test test-slow lint format train bench bench-data gpu-check clean

# Idempotent: re-runs only when pyproject.toml changes. torch is pinned so that pip takes the
# CPU wheel instead of pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" numpy
	$(PY) -m pip install -q -e ".[dev,hf,gguf,data]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

test: setup lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m "not slow" tests

# The long tests (@pytest.mark.slow, minutes): preparing and loading a 1 GB synthetic corpus,
# a rank crash restarted by torchrun, tensor x context parallelism at tp 4 x cp 2 on 8 ranks.
test-slow: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m slow -s tests

train: setup
	$(VENV)/bin/multitoken train $(ARGS)

bench: setup
	$(PY) bench/lookahead.py
	$(PY) bench/loss.py
	$(PY) bench/step.py

# Tokenisation throughput, store size, loader speed and RSS against corpus size (minutes).
bench-data: setup
	$(PY) bench/data.py

# Every CUDA path against the CPU fp32 reference, on a machine with an NVIDIA GPU (< 8 min on
# one H100; not part of `make test`). Without a GPU every check is SKIP; ARGS="--cpu-smoke"
# runs the comparisons at tiny sizes on the CPU.
gpu-check: setup
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
