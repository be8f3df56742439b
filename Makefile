# dabbawala: make setup | demo | test | lint
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
C_SOURCES := $(wildcard agent/bpf/*.c agent/bpf/include/*.h)

.PHONY: vagrant-test vagrant-box wheel setup demo test test-unit test-kernel test-cluster lint fmt clean gen gen-check bench bench-quick

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/dabba demo

test: setup
	$(PY) -m pytest -ra tests/unit
	$(PY) -m pytest -ra tests/kernel tests/cluster

# dabbawala against Envoy sidecars and no mesh (bench/README.md); results in bench/results/
bench: setup
	$(PY) -m bench.overhead

# every mode and scenario once, short: under 2 minutes (a test runs the same)
BENCH_QUICK := --duration 2 --repeat 1 --conns 16
bench-quick: setup
	$(PY) -m bench.overhead $(BENCH_QUICK)

# Three real VMs (control, node1, node2) installed through the systemd path from offline
# media, an end-to-end check across them, destroyed (vagrant/README.md); about 13 minutes here
vagrant-test: setup
	bash vagrant/run-test.sh

vagrant-box: setup
	bash vagrant/setup-host.sh
	bash vagrant/build-box.sh

# the project's wheel in dist/ (what `pip install` on a host takes)
wheel: setup
	rm -rf dist && $(VENV)/bin/pip wheel -q --no-deps -w dist .

test-unit: setup
	$(PY) -m pytest -ra tests/unit

test-kernel: setup
	$(PY) -m pytest -ra tests/kernel

test-cluster: setup
	$(PY) -m pytest -ra tests/cluster

PROTOS := $(wildcard agent/control/proto/*.proto)

# Generated gRPC code lives next to its .proto and is committed; gen-check
# regenerates into a temporary folder and fails on any difference.
gen: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. $(PROTOS)
	$(PY) -m agent.install deploy/systemd

gen-check: setup
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -I. --python_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) && \
	for f in $$(cd $$tmp && find . -name '*.py'); do \
		diff -u $$tmp/$$f $$f || { echo "gen-check: $$f is stale, run make gen"; rm -rf $$tmp; exit 1; }; \
	done; \
	$(PY) -m agent.install $$tmp/systemd && \
	for f in $$(cd $$tmp/systemd && ls); do \
		diff -u $$tmp/systemd/$$f deploy/systemd/$$f || { echo "gen-check: deploy/systemd/$$f is stale, run make gen"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "gen-check: generated code and units are up to date"

lint: setup gen-check
	$(VENV)/bin/ruff check agent tests bench vagrant
	$(VENV)/bin/ruff format --check agent tests bench vagrant
	clang-format --dry-run --Werror $(C_SOURCES)

fmt: setup
	$(VENV)/bin/ruff format agent tests bench vagrant
	$(VENV)/bin/ruff check --fix agent tests bench vagrant
	clang-format -i $(C_SOURCES)

clean:
	rm -rf $(VENV) .pytest_cache
