"""Tombstones in the watch-backed caches (cache.py): a deleted object never comes back from a
late watch event, a late GET or write response, or a list made before its deletion; a
re-created object (new uid, higher resourceVersion) is read at once.

The first tests feed events to a cache in the bad orders by hand (deterministic); the last
ones run against the real control plane."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.resources.core_v1 import ConfigMap, Namespace
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator import cache as cache_module
from tenantry_operator.cache import MISS, KindCache
from tenantry_operator.kube import FIELD_MANAGER, Kube
from tenantry_operator.names import standard_labels

NAMESPACE = "tombstone-test"


def obj(version: int | str, uid: str = "uid-1", name: str = "n", **labels: str
        ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": uid, "resourceVersion": str(version),
                         "labels": labels}}


@pytest.fixture
async def cache() -> AsyncIterator[KindCache]:
    """A complete cache (a miss says absent) never started: events are fed by hand. Its client
    makes no request."""
    client = AsyncClient(config=KubeConfig.from_one(
        cluster=Cluster(server="https://127.0.0.1:9"), user=User(token="unused")))
    found = KindCache(client, Namespace, None)
    found.listed.set()
    found._connected = True
    yield found
    await client.close()


def test_a_late_event_older_than_the_deletion_does_not_bring_it_back(cache: KindCache) -> None:
    cache._event({"type": "ADDED", "object": obj(10)})
    cache._event({"type": "DELETED", "object": obj(12)})
    # A MODIFIED of rv 11 handled after the DELETED (a relist's event, a resumed watch).
    cache._event({"type": "MODIFIED", "object": obj(11, v="late")})
    assert cache.get("n") is None
    # A GET answered before the deletion, stored after it (Kube.read's put).
    cache.put(obj(11, v="late-get"))
    assert cache.get("n") is None


def test_a_recreated_object_is_taken_at_once_and_the_old_ones_events_stay_buried(
    cache: KindCache,
) -> None:
    cache._event({"type": "ADDED", "object": obj(10)})
    cache._event({"type": "DELETED", "object": obj(12)})
    cache.put(obj(15, uid="uid-2", v="new"))  # the operator's apply re-created it
    assert cache.get("n")["metadata"]["uid"] == "uid-2"
    cache._event({"type": "MODIFIED", "object": obj(11, v="late")})  # the old one, late
    assert cache.get("n")["metadata"]["labels"] == {"v": "new"}
    # The deletion's event arriving after the re-creation leaves the new object alone.
    cache._event({"type": "DELETED", "object": obj(12)})
    assert cache.get("n")["metadata"]["uid"] == "uid-2"
    # A re-creation seen first by the watch is taken too.
    cache._event({"type": "DELETED", "object": obj(16, uid="uid-2")})
    cache._event({"type": "ADDED", "object": obj(17, uid="uid-3")})
    assert cache.get("n")["metadata"]["uid"] == "uid-3"


def test_a_label_put_back_brings_the_same_object_back(cache: KindCache) -> None:
    """A label-filtered watch sends DELETED when the label is removed; put back, the same
    uid returns with a higher resourceVersion and is taken."""
    cache._event({"type": "ADDED", "object": obj(10)})
    cache._event({"type": "DELETED", "object": obj(12)})
    cache._event({"type": "ADDED", "object": obj(14, v="labelled-again")})
    assert cache.get("n")["metadata"]["labels"] == {"v": "labelled-again"}


def test_versions_that_are_no_numbers_fall_back_to_the_uid(cache: KindCache) -> None:
    cache._event({"type": "ADDED", "object": obj("a1")})
    cache._event({"type": "DELETED", "object": obj("a3")})
    cache._event({"type": "MODIFIED", "object": obj("a2", v="late")})  # same uid: buried
    assert cache.get("n") is None
    cache._event({"type": "ADDED", "object": obj("b1", uid="uid-2")})  # new uid: taken
    assert cache.get("n")["metadata"]["uid"] == "uid-2"


def test_the_operators_own_delete_buries_by_the_servers_answer(cache: KindCache) -> None:
    # A Status answer names the deleted object's uid, no resourceVersion.
    cache.put(obj(10))
    cache.deleted("n", None, {"kind": "Status", "status": "Success",
                              "details": {"name": "n", "uid": "uid-1"}})
    assert cache.get("n") is None
    cache._event({"type": "MODIFIED", "object": obj(11, v="late")})
    assert cache.get("n") is None
    cache.put(obj(20, uid="uid-2"))
    assert cache.get("n")["metadata"]["uid"] == "uid-2"
    # The deleted object as answer: its uid and the deletion's resourceVersion.
    cache.deleted("n", None, obj(21, uid="uid-2"))
    cache.put(obj(20, uid="uid-2"))
    assert cache.get("n") is None
    # Not found: what the cache held is gone.
    cache.put(obj(30, uid="uid-3"))
    cache.deleted("n", None, None)
    cache._event({"type": "MODIFIED", "object": obj(30, uid="uid-3")})
    assert cache.get("n") is None


def test_a_terminating_object_stays_until_its_deleted_event(cache: KindCache) -> None:
    cache.put(obj(10))
    terminating = obj(11)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-27T23:00:00Z"
    cache.deleted("n", None, terminating)  # finalizers hold it: it still exists
    assert cache.get("n")["metadata"]["deletionTimestamp"] == "2026-11-27T23:00:00Z"
    cache._event({"type": "MODIFIED", "object": {**terminating, "spec": {"finalizers": []}}})
    assert cache.get("n") is not None
    cache._event({"type": "DELETED", "object": obj(13)})
    assert cache.get("n") is None


def test_tombstones_expire_and_their_memory_is_bounded(
    cache: KindCache, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_module, "TOMBSTONE_SECONDS", 0.0)
    for index in range(1000):
        cache._event({"type": "DELETED", "object": obj(index + 1, name=f"n{index}")})
    # Each expired when the next was laid: only the last is held.
    assert len(cache._tombstones) == 1
    # Past its time a tombstone buries nothing (the race it guards lasts seconds).
    cache._event({"type": "MODIFIED", "object": obj(1, name="n999")})
    assert cache.get("n999") is not None


# --- against the real control plane ------------------------------------------------------------

def config_map(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": standard_labels("tombt", "tombstone-test")},
            "data": data}


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[Kube]:
    control_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    found = Kube(AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig),
                             field_manager=FIELD_MANAGER))
    assert found.use_fast_path()
    assert await found.start_caches(wait_seconds=60)
    try:
        yield found
    finally:
        await found.close()


def config_maps(kube: Kube) -> KindCache:
    assert kube.caches is not None
    found: KindCache = kube.caches.by_kind[ConfigMap]
    return found


def live(plane: ControlPlane, name: str) -> dict[str, Any]:
    out = plane.kubectl("get", "configmap", "-n", NAMESPACE, name, "-o", "json")
    found: dict[str, Any] = json.loads(out.stdout)
    return found


async def test_a_deleted_then_recreated_object_is_read_as_the_new_one(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    old = await kube.apply(config_map("tomb-one", value="old"))
    # A GET of the old object answered before the delete (what Kube.read stores later).
    late_get = await kube.fast.get(ConfigMap, "tomb-one", NAMESPACE) if kube.fast else None
    assert late_get is not None
    assert await kube.delete(ConfigMap, "tomb-one", NAMESPACE)
    assert config_maps(kube).get("tomb-one", NAMESPACE) is MISS
    # The server's answer to the DELETE named the deleted object.
    assert config_maps(kube)._tombstones[(NAMESPACE, "tomb-one")].uid == old["metadata"]["uid"]
    assert await kube.read(ConfigMap, "tomb-one", NAMESPACE) is None
    config_maps(kube).put(late_get)  # the late response is refused
    assert config_maps(kube).get("tomb-one", NAMESPACE) is MISS
    # Re-created at once by the operator: read back as the new one, never the old.
    new = await kube.apply(config_map("tomb-one", value="new"))
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    read = await kube.read(ConfigMap, "tomb-one", NAMESPACE)
    assert read is not None and read["data"] == {"value": "new"}
    config_maps(kube).put(late_get)
    await asyncio.sleep(0.5)  # the watch's DELETED and ADDED events arrive meanwhile
    read = await kube.read(ConfigMap, "tomb-one", NAMESPACE)
    assert read is not None and read["metadata"]["uid"] == new["metadata"]["uid"]
    # Deleted and re-created by hand: the watch delivers both; the new one is read.
    control_plane.kubectl("delete", "configmap", "-n", NAMESPACE, "tomb-one")
    control_plane.kubectl("create", "configmap", "-n", NAMESPACE, "tomb-one",
                          "--from-literal=value=by-hand")
    control_plane.kubectl("label", "configmap", "-n", NAMESPACE, "tomb-one",
                          *(f"{k}={v}" for k, v in config_map("x")["metadata"]["labels"].items()))
    by_hand = live(control_plane, "tomb-one")
    for _ in range(600):
        found = await kube.read(ConfigMap, "tomb-one", NAMESPACE)
        assert found is not None
        assert found["metadata"]["uid"] in (new["metadata"]["uid"], by_hand["metadata"]["uid"])
        if found["metadata"]["resourceVersion"] == by_hand["metadata"]["resourceVersion"]:
            break
        await asyncio.sleep(0.05)
    assert found["metadata"]["uid"] == by_hand["metadata"]["uid"], "never read the new one"
    assert found["data"] == {"value": "by-hand"}


async def test_a_list_made_before_a_deletion_does_not_bring_it_back(
    control_plane: ControlPlane, kube: Kube,
) -> None:
    """The list's answer (a snapshot taken before the operator's delete) is handled after it:
    the deleted object stays out, and an object written meanwhile stays in."""
    await kube.apply(config_map("tomb-listed", value="1"))
    cache = config_maps(kube)
    real_send = cache._generic.send

    async def send_then_delete(request: Any, **kwargs: Any) -> Any:
        response = await real_send(request, **kwargs)
        if not kwargs.get("stream"):  # the list's page, before the cache handles it
            await kube.delete(ConfigMap, "tomb-listed", NAMESPACE)
            written = await kube.apply(config_map("tomb-written", value="2"))
            # The running watch has handled both (the DELETED too) before the list is.
            version = int(written["metadata"]["resourceVersion"])
            for _ in range(600):
                if int(cache._resource_version) >= version:
                    break
                await asyncio.sleep(0.05)
            assert int(cache._resource_version) >= version, "the watch did not deliver"
        return response

    cache._generic = _Sending(cache._generic, send_then_delete)
    try:
        await cache._list()
    finally:
        cache._generic = cache._generic.inner
    assert cache.get("tomb-listed", NAMESPACE) is MISS
    assert await kube.read(ConfigMap, "tomb-listed", NAMESPACE) is None
    assert (cache.get("tomb-written", NAMESPACE) or {})["data"] == {"value": "2"}


class _Sending:
    """lightkube's request builder with its `send` wrapped (the real server answers)."""

    def __init__(self, inner: Any, send: Any) -> None:
        self.inner, self.send = inner, send

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
