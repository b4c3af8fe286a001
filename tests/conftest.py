"""Session fixtures that start real servers: the Kubernetes control plane, Postgres, Redis.

A server that fails to start is a test error carrying its log tail, never a skip.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tenantry_devenv.controlplane import ControlPlane, start_control_plane
from tenantry_devenv.services import Postgres, Redis, start_postgres, start_redis


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tenantry-test-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def control_plane(workdir: Path) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok, with the CRDs installed."""
    plane = start_control_plane(workdir / "cluster")
    try:
        crds = Path(__file__).resolve().parents[1] / "crds"
        plane.kubectl("apply", "--server-side", "-f", str(crds))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      "crd/tenants.tenantry.dev", "crd/tenantplans.tenantry.dev")
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def postgres(workdir: Path) -> Iterator[Postgres]:
    """Embedded PostgreSQL 18 with pgvector, password authentication on 127.0.0.1."""
    server = start_postgres(workdir / "pg-shared")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[Redis]:
    server = start_redis(workdir / "redis")
    try:
        yield server
    finally:
        server.stop()


def pytest_report_header() -> str:
    return f"tenantry: KUBECONFIG from fixtures (ambient KUBECONFIG={os.environ.get('KUBECONFIG')})"
