# dabbawala: make setup | demo | test | lint
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
C_SOURCES := $(wildcard agent/bpf/*.c agent/bpf/include/*.h)

.PHONY: setup demo test test-unit test-kernel test-cluster lint fmt clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/dabba demo

test: setup
	$(PY) -m pytest -ra tests/unit
	$(PY) -m pytest -ra tests/kernel tests/cluster

test-unit: setup
	$(PY) -m pytest -ra tests/unit

test-kernel: setup
	$(PY) -m pytest -ra tests/kernel

test-cluster: setup
	$(PY) -m pytest -ra tests/cluster

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench
	clang-format --dry-run --Werror $(C_SOURCES)

fmt: setup
	$(VENV)/bin/ruff format agent tests bench
	$(VENV)/bin/ruff check --fix agent tests bench
	clang-format -i $(C_SOURCES)

clean:
	rm -rf $(VENV) .pytest_cache
