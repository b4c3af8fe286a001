"""The runtime's Kubernetes source against the real API server: list, watch, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import pytest
from lightkube import AsyncClient, KubeConfig
from runtime_helpers import tenant_config
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator import builders
from tenantry_runtime.api_keys import generate_key, record_for
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.kube_source import KubeSource
from tenantry_runtime.store import TenantRecord, TenantStore

pytestmark = pytest.mark.timeout(120)
NAMESPACE = "keysource"


def apply_record(plane: ControlPlane, record: TenantRecord, namespace: str = NAMESPACE) -> None:
    secret = builders.runtime_record_secret(record.config.tenant, namespace,
                                            runtime_record.record_json(record))
    plane.kubectl("apply", "-f", "-", input_text=json.dumps(secret))


async def until(what: str, check: Callable[[], object], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def namespace(control_plane: ControlPlane) -> str:
    control_plane.kubectl("create", "namespace", NAMESPACE)
    return NAMESPACE


@pytest.fixture
async def running(control_plane: ControlPlane, namespace: str) -> AsyncIterator[KubeSource]:
    def connect() -> AsyncClient:
        return AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig))

    source = KubeSource(namespace, TenantStore(), connect=connect, backoff_seconds=0.05)
    task = asyncio.create_task(source.run())
    await until("the first list", lambda: source.store.loaded)
    yield source
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_records_are_listed_watched_refused_and_removed(
        control_plane: ControlPlane, running: KubeSource) -> None:
    store, key = running.store, generate_key()[0]
    good = TenantRecord(config=tenant_config("srca", revision=3),
                        api_keys=(record_for(key, "app"),))
    apply_record(control_plane, good)
    await until("the record", lambda: store.get("srca") == good)
    assert store.authenticate(key) is not None
    # Unlabelled Secrets and other namespaces are not read.
    other = builders.runtime_record_secret("srcb", "default", runtime_record.record_json(
        TenantRecord(config=tenant_config("srcb"))))
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(other))
    # Invalid content: refused, the last good record stays in force.
    control_plane.kubectl("patch", "secret", runtime_record.secret_name("srca"), "-n", NAMESPACE,
                          "--type=merge", "-p", json.dumps({"data": {
                              runtime_record.DATA_KEY: "bm90IGpzb24="}}))
    await until("the refusal", lambda: store.refused["invalid"] >= 1)
    assert store.get("srca") == good
    stale = good.model_copy(update={"config": tenant_config("srca", revision=2)})
    apply_record(control_plane, stale)
    await until("the stale write", lambda: store.stale_ignored >= 1)
    assert store.get("srca") == good
    control_plane.kubectl("delete", "secret", "--wait=false",
                          runtime_record.secret_name("srca"), "-n", NAMESPACE)
    await until("the removal", lambda: store.get("srca") is None)
    assert store.authenticate(key) is None
    assert store.get("srcb") is None


async def test_an_unreachable_api_server_keeps_the_tenants_and_is_retried(
        control_plane: ControlPlane, namespace: str) -> None:
    calls = 0

    def connect() -> AsyncClient:
        nonlocal calls
        calls += 1
        if calls < 3:  # the API server is not reachable at first
            return AsyncClient(config=KubeConfig.from_server("https://127.0.0.1:1"))
        return AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig))

    record = TenantRecord(config=tenant_config("srcd"))
    apply_record(control_plane, record)
    source = KubeSource(namespace, TenantStore(), connect=connect, backoff_seconds=0.05)
    task = asyncio.create_task(source.run())
    try:
        await until("the record after reconnecting", lambda: source.store.get("srcd") == record)
        assert source.errors >= 1
    finally:
        task.cancel()


async def test_a_watch_is_restarted_from_a_fresh_list_after_watch_seconds(
        control_plane: ControlPlane, namespace: str) -> None:
    source = KubeSource(namespace, TenantStore(), backoff_seconds=0.05, watch_seconds=0.3,
                        connect=lambda: AsyncClient(
                            config=KubeConfig.from_file(control_plane.kubeconfig)))
    task = asyncio.create_task(source.run())
    try:
        await until("two restarts", lambda: source.relists >= 2)
        assert source.errors == 0
        record = TenantRecord(config=tenant_config("srce"))
        apply_record(control_plane, record)
        await until("the record", lambda: source.store.get("srce") == record)
    finally:
        task.cancel()
