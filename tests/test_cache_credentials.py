"""Credential Secrets are read through the watch-backed cache (dataplane.secret_value): one
the operator has just applied is read back from the apply's answer, with no GET, even before
any watch event (the cache here is never started: no event can arrive)."""

from __future__ import annotations

from lightkube import AsyncClient, KubeConfig
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator.builders import CREDENTIAL_LABEL
from tenantry_operator.cache import Caches
from tenantry_operator.dataplane import backup_password, secret_value
from tenantry_operator.kube import FIELD_MANAGER, Kube, cached_kinds
from tenantry_operator.names import standard_labels

NAMESPACE = "cache-credentials"


async def test_a_credential_secret_just_applied_is_read_back_without_a_get(
    control_plane: ControlPlane,
) -> None:
    control_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    client = AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig),
                         field_manager=FIELD_MANAGER)
    kube = Kube(client)
    assert kube.use_fast_path()
    kube.caches = Caches(client, cached_kinds())  # listed (empty), never watching
    for cache in kube.caches.by_kind.values():
        cache.listed.set()
        cache._connected = True
    labels = {**standard_labels("credt", "credentials"), CREDENTIAL_LABEL: "db"}
    try:
        await kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": "tenantry-credt.db", "namespace": NAMESPACE,
                                       "labels": labels},
                          "stringData": {"password": "s3cret"}})
        offset = control_plane.audit_offset()
        assert await secret_value(kube, NAMESPACE, "tenantry-credt.db", "password") == "s3cret"
        assert await backup_password(kube, NAMESPACE, "credt", "db") == "s3cret"
        reads = [r for r in control_plane.requests_since(offset, {"get"})
                 if (r.get("objectRef") or {}).get("namespace") == NAMESPACE]
        assert reads == []
        # A Secret without the operator's label (made by hand) is not in the cache: the API
        # server is asked, as before.
        control_plane.kubectl("create", "secret", "generic", "handmade", "-n", NAMESPACE,
                              "--from-literal=password=by-hand")
        assert await secret_value(kube, NAMESPACE, "handmade", "password") == "by-hand"
        assert [r["objectRef"]["name"] for r in control_plane.requests_since(offset, {"get"})
                if (r.get("objectRef") or {}).get("namespace") == NAMESPACE] == ["handmade"]
    finally:
        control_plane.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        await kube.close()
