# One entry point for people and CI. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test test-gpu-versions demo up proto venv clean

venv: $(STAMP)

# Reinstall when the dependency list changes. torch is pinned first so pip takes the CPU
# wheel already on these machines' disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.11,<2.15"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inference and bench tests on the GPU machine's releases (bench/gpu_versions.txt: torch
# 2.11 cu130, transformers 5.17, Python 3.12), run on this CPU before device time is spent on an
# API that moved between releases. Downloads about 3 GB (torch's CUDA build); not part of `test`.
# The machine runs Python 3.12: pyenv's 3.12 where there is one (these machines), else python3.12.
PYTHON_GPU ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VENV := .venv-gpu-versions
test-gpu-versions:
	test -x $(GPU_VENV)/bin/python || $(PYTHON_GPU) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/pip install --quiet -c bench/gpu_versions.txt torch
	$(GPU_VENV)/bin/pip install --quiet -c bench/gpu_versions.txt -e ".[test]"
	$(GPU_VENV)/bin/python -m pytest -p no:cacheprovider tests/inference tests/bench $(PYTEST_ARGS)

# The brief's whole pipeline for customers A, B and C, then serving until Ctrl-C.
# DEMO_ARGS=--once runs it and exits (0 only if every check passed).
demo: $(STAMP)
	$(BIN)/loraplex demo $(DEMO_ARGS)

up: $(STAMP)
	$(BIN)/loraplex up $(UP_ARGS)

proto: $(STAMP)
	$(BIN)/python -m services.common.protogen

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache
