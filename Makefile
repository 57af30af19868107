# One entry point for people and CI. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo up proto venv clean

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

# The brief's whole pipeline for customers A, B and C, then serving until Ctrl-C.
# DEMO_ARGS=--once runs it and exits (0 only if every check passed).
demo: $(STAMP)
	$(BIN)/loraplex demo $(DEMO_ARGS)

up: $(STAMP)
	$(BIN)/loraplex up $(UP_ARGS)

proto: $(STAMP)
	$(BIN)/python -m services.common.protogen

clean:
	rm -rf $(VENV) .pytest_cache
