"""Session fixtures that start real servers: the Kubernetes control plane, Postgres, Redis.

A server that fails to start is a test error carrying its log tail, never a skip.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tenantry_devenv.controlplane import ControlPlane, start_control_plane
from tenantry_devenv.services import Postgres, Redis, start_postgres, start_redis
from tenantry_runtime.resp import PipelinedRedis


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tenantry-test-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def control_plane(workdir: Path) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok, with the CRDs installed."""
    plane = start_control_plane(workdir / "cluster")
    try:
        plane.install_crds()
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


@pytest.fixture
async def pipelined_redis(redis_server: Redis) -> AsyncIterator[PipelinedRedis]:
    """The runtime's Redis client (replies within 5 s) on the session's redis-server."""
    client = PipelinedRedis(redis_server.url, timeout=5)
    yield client
    await client.aclose()


def pytest_report_header() -> str:
    return f"tenantry: KUBECONFIG from fixtures (ambient KUBECONFIG={os.environ.get('KUBECONFIG')})"


@pytest.fixture(scope="session")
def shared_database(postgres: Postgres) -> str:
    """Admin DSN of a `tenantry` database in the embedded Postgres, as the operator uses it."""
    import psycopg

    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE tenantry")
    return postgres.dsn("tenantry")


# Silo tenants of the integration tests. Their StatefulSets run under kwok (no real container),
# so the operator reaches each silo's database through TENANTRY_SILO_DSN_OVERRIDES: one
# database per silo in a second embedded Postgres, the setting a user needs when the operator
# runs outside the cluster.
SILO_TENANTS = ("silo1", "upsilo", "silodel", "poolsilo", "silogrow", "silofixed", "silocreds",
                "quietsilo", "silo-co")
# The operator's own namespace, where it keeps copies of the credentials it generates (it
# creates the namespace when missing).
CREDENTIALS_NAMESPACE = "tenantry-operator-test"  # not the chart's runtime namespace
# Where the operator writes the runtime's copy of each tenant, and the runtime reads it.
RUNTIME_NAMESPACE = "tenantry-runtime-test"


@pytest.fixture(scope="session")
def silo_postgres(workdir: Path) -> Iterator[Postgres]:
    """A second Postgres server standing in for the silo Pods' databases."""
    import psycopg
    from psycopg import sql

    server = start_postgres(workdir / "pg-silo")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for tenant in SILO_TENANTS:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"silo_{tenant}")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def operator(
    control_plane: ControlPlane, shared_database: str, redis_server: Redis,
    silo_postgres: Postgres,
) -> Iterator[object]:
    """The operator in-process (kopf's KopfRunner) against the real control plane."""
    import json

    from kopf.testing import KopfRunner

    control_plane.add_persistent_volumes(10, size="100Gi")
    os.environ.update({
        "KUBECONFIG": str(control_plane.kubeconfig),
        "TENANTRY_DATABASE_URL": shared_database,
        "TENANTRY_REDIS_URL": redis_server.url,
        "TENANTRY_RECONCILE_INTERVAL_SECONDS": "3",
        # Budget alerts (issue 10): delivered each second, to the tests' local receivers.
        "TENANTRY_ALERTS_INTERVAL_SECONDS": "1",
        "TENANTRY_ALERTS_WEBHOOK_ALLOW_PRIVATE": "true",
        "TENANTRY_CREDENTIALS_NAMESPACE": CREDENTIALS_NAMESPACE,
        "TENANTRY_RUNTIME_NAMESPACE": RUNTIME_NAMESPACE,
        "TENANTRY_SILO_DSN_OVERRIDES": json.dumps(
            {t: silo_postgres.dsn(f"silo_{t}") for t in SILO_TENANTS}),
    })
    from tenantry_operator.settings import get_settings

    get_settings.cache_clear()
    plans = Path(__file__).resolve().parents[1] / "examples" / "plans.yaml"
    control_plane.kubectl("apply", "-f", str(plans))
    runner = KopfRunner(["run", "--all-namespaces", "--standalone", "--verbose",
                         "-m", "tenantry_operator.handlers"])
    with runner:
        yield runner
    if runner.exception is not None:
        raise runner.exception


# --- Runtime (issue 7): the local model endpoint and the runtime, each under a real uvicorn ---

@pytest.fixture(scope="session")
def upstream_stub() -> Iterator[tuple[str, object]]:
    """The local Messages-API endpoint: (base URL, its StubState recording what it received)."""
    from runtime_helpers import UPSTREAM_KEY, serve
    from tenantry_runtime.upstream_stub import StubState, create_stub_app

    state = StubState(api_key=UPSTREAM_KEY)
    with serve(create_stub_app(state)) as url:
        yield url, state


@pytest.fixture(scope="session")
def runtime_server(workdir: Path, redis_server: Redis,
                   upstream_stub: tuple[str, object]) -> Iterator[object]:
    """The runtime app reading tenants from a directory, limits from the test Redis."""
    from pydantic import SecretStr
    from runtime_helpers import UPSTREAM_KEY, RuntimeServer, serve
    from tenantry_runtime.app import create_app
    from tenantry_runtime.settings import RuntimeSettings
    from tenantry_runtime.store import TenantStore

    tenants_dir = workdir / "runtime-tenants"
    tenants_dir.mkdir()
    stub_url, stub = upstream_stub
    settings = RuntimeSettings(
        tenants_dir=tenants_dir, config_poll_seconds=0.1, redis_url=SecretStr(redis_server.url),
        upstream_url=stub_url, upstream_api_key=SecretStr(UPSTREAM_KEY),
        upstream_backoff_seconds=0.01, upstream_backoff_max_seconds=0.05,
        max_body_bytes=64 * 1024, max_concurrent_per_tenant=1000)
    store = TenantStore()
    from tenantry_runtime.serving import CoalescingHttpToolsProtocol

    app = create_app(settings, store)
    with serve(app, http=CoalescingHttpToolsProtocol) as url:
        yield RuntimeServer(url, tenants_dir, redis_server.url, stub, store, app)


@pytest.fixture(scope="session")
def kube_runtime_server(operator: object, shared_database: str, redis_server: Redis,
                        upstream_stub: tuple[str, object]) -> Iterator[object]:
    """The runtime reading tenant records from the control plane (the Secrets the in-process
    operator writes into RUNTIME_NAMESPACE), metering into the shared database."""
    from pydantic import SecretStr
    from runtime_helpers import UPSTREAM_KEY, KubeRuntime, serve
    from tenantry_runtime.app import create_app
    from tenantry_runtime.settings import RuntimeSettings
    from tenantry_runtime.store import TenantStore

    stub_url, _ = upstream_stub
    settings = RuntimeSettings(
        config_source="kubernetes", kube_namespace=RUNTIME_NAMESPACE,
        redis_url=SecretStr(redis_server.url), upstream_url=stub_url,
        upstream_api_key=SecretStr(UPSTREAM_KEY), database_url=SecretStr(shared_database),
        usage_flush_seconds=0.2, replica_name="kube-runtime")
    store = TenantStore()
    app = create_app(settings, store)
    with serve(app) as url:
        yield KubeRuntime(url, store, app)
