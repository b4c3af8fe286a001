"""The operator's watch-backed caches (cache.py, Kube.read) against the real control plane:
reads after writes, objects deleted or unlabelled by hand, someone else's object of the same
name, and a watch the server ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import ConfigMap, Namespace
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator.cache import MISS, KindCache, compact, expand
from tenantry_operator.kube import FIELD_MANAGER, ForeignObject, Kube, TenantPlan
from tenantry_operator.names import standard_labels

NAMESPACE = "cache-test"


def config_map(name: str, tenant: str = "cachet", **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": standard_labels(tenant, "cache-test")},
            "data": data}


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[Kube]:
    control_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    client = AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig),
                         field_manager=FIELD_MANAGER)
    found = Kube(client)
    assert found.use_fast_path()  # a client certificate: requests go over aiohttp
    assert await found.start_caches(wait_seconds=60)
    try:
        yield found
    finally:
        await found.close()


async def eventually(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the watch did not deliver in time"
        await asyncio.sleep(0.05)


def cached(kube: Kube, kind: Any, name: str, namespace: str | None = NAMESPACE) -> Any:
    assert kube.caches is not None
    return kube.caches.by_kind[kind].get(name, namespace)


async def test_a_write_is_read_back_at_once_and_a_settled_object_is_read_from_the_watch(
    kube: Kube,
) -> None:
    applied = await kube.apply(config_map("cache-one", value="1"))
    # Read after write: the apply's response, before any watch event could be relied on.
    assert cached(kube, ConfigMap, "cache-one")["data"] == {"value": "1"}
    assert (await kube.read(ConfigMap, "cache-one", NAMESPACE) or {})["data"] == {"value": "1"}
    # No managedFields kept: memory follows what the operator compares.
    assert "managedFields" not in cached(kube, ConfigMap, "cache-one")["metadata"]
    # Applying the same again is no write: the cached object is up to date.
    again = await kube.apply(config_map("cache-one", value="1"))
    assert again["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]


async def test_a_refused_request_is_lightkubes_api_error_with_the_servers_status(
    kube: Kube,
) -> None:
    manifest = {**config_map("cache-nowhere", value="1")}
    manifest["metadata"] = {**manifest["metadata"], "namespace": "no-such-namespace"}
    with pytest.raises(ApiError) as refused:
        await kube.apply(manifest)
    assert refused.value.status.code == 404
    assert "no-such-namespace" in str(refused.value.status.message)
    assert await kube.read(ConfigMap, "cache-nowhere", "no-such-namespace") is None


async def test_a_restarted_operator_finds_its_settled_objects_up_to_date_in_the_list(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    applied = await kube.apply(config_map("cache-listed", value="1"))
    restarted = Kube(AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig),
                                 field_manager=FIELD_MANAGER))
    try:
        assert await restarted.start_caches(wait_seconds=60)
        listed = cached(restarted, ConfigMap, "cache-listed")
        assert (listed["apiVersion"], listed["kind"]) == ("v1", "ConfigMap")
        again = await restarted.apply(config_map("cache-listed", value="1"))
        assert again["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]
    finally:
        await restarted.close()


async def test_an_object_deleted_by_hand_leaves_the_cache_and_is_recreated(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    await kube.apply(config_map("cache-two", value="2"))
    control_plane.kubectl("delete", "configmap", "-n", NAMESPACE, "cache-two")
    # The watch removes it; a label-filtered cache does not claim absence: the API server says.
    await eventually(lambda: cached(kube, ConfigMap, "cache-two") is MISS)
    assert await kube.read(ConfigMap, "cache-two", NAMESPACE) is None
    await kube.apply(config_map("cache-two", value="2"))
    live = control_plane.kubectl("get", "configmap", "-n", NAMESPACE, "cache-two", "-o", "json")
    assert json.loads(live.stdout)["data"] == {"value": "2"}


async def test_an_edit_by_hand_reaches_the_cache_and_is_repaired(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    await kube.apply(config_map("cache-three", value="3"))
    control_plane.kubectl("patch", "configmap", "-n", NAMESPACE, "cache-three", "--type=merge",
                          "-p", json.dumps({"data": {"value": "edited"}}))
    await eventually(lambda: cached(kube, ConfigMap, "cache-three")["data"]["value"] == "edited")
    await kube.apply(config_map("cache-three", value="3"))
    live = control_plane.kubectl("get", "configmap", "-n", NAMESPACE, "cache-three", "-o", "json")
    assert json.loads(live.stdout)["data"] == {"value": "3"}


async def test_someone_elses_object_is_never_taken_over_although_the_cache_lacks_it(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    control_plane.kubectl("create", "configmap", "-n", NAMESPACE, "cache-foreign",
                          "--from-literal=owner=someone")
    await asyncio.sleep(0.5)
    assert cached(kube, ConfigMap, "cache-foreign") is MISS  # no label: not watched
    with pytest.raises(ForeignObject):
        await kube.apply(config_map("cache-foreign", value="mine"))
    # A label removed by hand makes an object of ours foreign too: it leaves the cache.
    await kube.apply(config_map("cache-four", value="4"))
    control_plane.kubectl("label", "configmap", "-n", NAMESPACE, "cache-four",
                          "app.kubernetes.io/managed-by-")
    await eventually(lambda: cached(kube, ConfigMap, "cache-four") is MISS)
    with pytest.raises(ForeignObject):
        await kube.apply(config_map("cache-four", value="4"))


async def test_a_complete_cache_answers_absence_and_sees_new_objects(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    assert cached(kube, TenantPlan, "no-such-plan", None) is None
    plan = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "TenantPlan",
            "metadata": {"name": "cache-plan"}, "spec": {"model": "claude-haiku-4-5"}}
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(plan))
    try:
        await eventually(lambda: cached(kube, TenantPlan, "cache-plan", None) is not None)
    finally:
        control_plane.kubectl("delete", "tenantplan", "cache-plan", "--wait=false")
    await eventually(lambda: cached(kube, TenantPlan, "cache-plan", None) is None)


async def test_a_watch_the_server_ends_resumes_without_losing_events(
    control_plane: ControlPlane,
) -> None:
    control_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    client = AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig))
    cache = KindCache(client, ConfigMap, "app.kubernetes.io/managed-by=tenantry-operator",
                      watch_seconds=1)
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.wait_for(cache.listed.wait(), 60)
        await asyncio.sleep(2.5)  # the server has ended the first watch(es)
        kube = Kube(client)
        await kube.apply(config_map("cache-five", value="5"))
        await eventually(lambda: cache.get("cache-five", NAMESPACE) is not MISS)
        control_plane.kubectl("delete", "configmap", "-n", NAMESPACE, "cache-five")
        await eventually(lambda: cache.get("cache-five", NAMESPACE) is MISS)
        assert cache.relists == 1  # resumed from its resourceVersion, never listed again
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_an_older_event_never_replaces_a_newer_write(control_plane: ControlPlane) -> None:
    client = AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig))
    cache = KindCache(client, Namespace, None)  # never started: events are fed by hand
    cache.listed.set()
    cache._connected = True
    newer = {"metadata": {"name": "n", "resourceVersion": "20", "labels": {"v": "new"}}}
    older = {"metadata": {"name": "n", "resourceVersion": "10", "labels": {"v": "old"}}}
    cache.put(newer)
    cache._event({"type": "MODIFIED", "object": older})
    assert cache.get("n")["metadata"]["labels"] == {"v": "new"}
    cache._event({"type": "DELETED", "object": older})  # a deletion older than the write
    assert cache.get("n") is not None
    cache._event({"type": "DELETED", "object": {"metadata": {"name": "n",
                                                             "resourceVersion": "21"}}})
    assert cache.get("n") is None
    await client.close()
    assert expand(compact({"metadata": {"name": "x", "managedFields": [{}]}})) == {
        "metadata": {"name": "x"}}
