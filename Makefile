# aad-med: `make demo` and `make test` each set up the environment first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aad-med-installed
# Which torch build: a CUDA wheel where an NVIDIA GPU answers, else the CPU build.
# On our machines `torch==2.13.0` resolves to a local CPU wheel; elsewhere set
# TORCH_CPU_INDEX (e.g. PyTorch's CPU wheel index) to avoid the multi-GB CUDA wheels.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_CUDA_SPEC ?= torch>=2.4
TORCH_CPU_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(HAS_GPU)" ]; then \
	  echo "NVIDIA GPU found: installing a CUDA build of torch"; \
	  $(BIN)/python -m pip install -q "$(TORCH_CUDA_SPEC)"; \
	else \
	  echo "no GPU found: installing the CPU build of torch"; \
	  $(BIN)/python -m pip install -q "$(TORCH_CPU_SPEC)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX)); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/ruff check aad_med tests scripts
	$(BIN)/ruff format --check aad_med tests scripts
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check aad_med tests scripts
	$(BIN)/ruff format --check aad_med tests scripts

format: setup
	$(BIN)/ruff format aad_med tests scripts
	$(BIN)/ruff check --fix aad_med tests scripts

bench: setup
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
