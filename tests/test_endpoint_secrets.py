"""A dedicated tenant's endpoint Secret: changes reach the runtime within seconds (issue 7).

The in-process operator labels the Secret the Tenant refers to and watches only labelled
Secrets; a runtime under uvicorn reads the tenant's record from the control plane; the
official SDK calls it; a dedicated stub accepts only the new key. Rotation, deletion and
re-creation each post an `EndpointSecretChanged` Event (the watch's path, not the resync's).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import anthropic
import pytest
from kube_helpers import (
    apply_tenant,
    condition,
    delete_tenant,
    get_json,
    tenant_status,
    wait_for,
    wait_ready,
)
from runtime_helpers import KubeRuntime, serve
from tenantry_devenv.controlplane import ControlPlane
from tenantry_runtime.upstream_stub import StubState, create_stub_app

pytestmark = [pytest.mark.usefixtures("operator"), pytest.mark.timeout(300)]

MODEL = "claude-sonnet-4-6"  # the pro plan's model
OLD_KEY, NEW_KEY = "sk-dedicated-old", "sk-dedicated-new"
log = logging.getLogger(__name__)


def secret_yaml(namespace: str, key: str) -> str:
    value = base64.b64encode(key.encode()).decode()
    return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: model-key\n  namespace: {namespace}"
            f"\ndata:\n  api-key: {value}\n")


def endpoint_key(runtime: KubeRuntime, tenant: str) -> str | None:
    record = runtime.store.get(tenant)
    key = record.endpoint_api_key if record is not None else None
    return key.get_secret_value() if key is not None else None


def changed_events(plane: ControlPlane, tenant: str) -> list[str]:
    events = get_json(plane, "events", "-A", "--field-selector",
                      f"involvedObject.name={tenant},reason=EndpointSecretChanged") or {}
    return [e["message"] for e in events.get("items", [])]


def seconds_until(what: str, check: Any, timeout: float = 30) -> float:
    started = time.monotonic()
    wait_for(what, check, timeout)
    return time.monotonic() - started


def test_rotated_deleted_and_recreated_endpoint_secret_reaches_the_runtime(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime,
        upstream_stub: tuple[str, Any]) -> None:
    # Imported once the operator runs: importing kopf handlers first would make kopf's login
    # (the kubernetes client) read KUBECONFIG before the fixtures set it.
    from tenantry_operator.endpoint_secrets import LABEL, LABEL_FIELD_MANAGER

    runtime, (_, shared) = kube_runtime_server, upstream_stub
    tenant, namespace = "dedrot", "tenant-dedrot"
    dedicated = StubState(api_key=NEW_KEY)
    with serve(create_stub_app(dedicated)) as dedicated_url:
        apply_tenant(control_plane, tenant, plan="pro", apiKeys=[{"name": "app"}],
                     ai={"endpoint": {"type": "dedicated", "url": dedicated_url,
                                      "secretRef": {"name": "model-key"}}})
        wait_for("the namespace", lambda: get_json(control_plane, "namespace", namespace), 60)
        control_plane.kubectl("apply", "-f", "-", input_text=secret_yaml(namespace, OLD_KEY))
        wait_ready(control_plane, tenant)
        keys = get_json(control_plane, "secret", "tenantry-api-keys", "-n", namespace) or {}
        app_key = base64.b64decode(keys["data"]["app"]).decode()
        wait_for("the old endpoint key in the runtime",
                 lambda: endpoint_key(runtime, tenant) == OLD_KEY, 30)

        # Labelled by its own field manager; the user's fields stay the user's.
        secret = get_json(control_plane, "secret", "model-key", "-n", namespace,
                          "--show-managed-fields") or {}
        assert secret["metadata"]["labels"][LABEL] == tenant
        managers = {m["manager"]: m for m in secret["metadata"]["managedFields"]}
        assert managers[LABEL_FIELD_MANAGER]["fieldsV1"] == {
            "f:metadata": {"f:labels": {f"f:{LABEL}": {}}}}
        assert managers[LABEL_FIELD_MANAGER]["operation"] == "Apply"
        # Labelled once: the resyncs (every 3 s here) write nothing more to it.
        time.sleep(7)
        assert (get_json(control_plane, "secret", "model-key", "-n", namespace) or {})[
            "metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]

        client = anthropic.Anthropic(base_url=runtime.url, api_key=app_key, max_retries=0)

        def call() -> anthropic.types.Message:
            return client.messages.create(model=MODEL, max_tokens=16,
                                          messages=[{"role": "user", "content": "hello"}])

        shared_before = len(shared.received)
        with pytest.raises(anthropic.APIStatusError) as wrong_key:
            call()  # the dedicated endpoint refuses the old key: 502, never the shared endpoint
        assert wrong_key.value.status_code == 502

        # Rotation: the runtime uses the new key within seconds, by the watch's event.
        control_plane.kubectl("apply", "-f", "-", input_text=secret_yaml(namespace, NEW_KEY))
        rotated = seconds_until("the new endpoint key in the runtime",
                                lambda: endpoint_key(runtime, tenant) == NEW_KEY)
        log.info("rotation reached the runtime in %.2f s", rotated)
        wait_for("the rotation's Event", lambda: any(
            "changed" in m for m in changed_events(control_plane, tenant)), 30)
        answered = len(dedicated.received)
        assert call().content
        assert len(dedicated.received) == answered + 1

        # Deletion: no key in the runtime, EndpointKeyMissing, 503, no fallback.
        control_plane.kubectl("delete", "secret", "model-key", "-n", namespace, "--wait=false")
        deleted = seconds_until("the endpoint key gone from the runtime",
                                lambda: endpoint_key(runtime, tenant) is None)
        log.info("deletion reached the runtime in %.2f s", deleted)
        wait_for("the deletion's Event", lambda: any(
            "deleted" in m for m in changed_events(control_plane, tenant)), 30)
        assert condition(tenant_status(control_plane, tenant),
                         "RuntimeRecordReady")["reason"] == "EndpointKeyMissing"
        with pytest.raises(anthropic.InternalServerError) as missing:
            call()
        assert missing.value.status_code == 503
        assert len(shared.received) == shared_before  # never fell back to the shared endpoint

        # Created again (unlabelled): found and labelled again, served again.
        control_plane.kubectl("apply", "-f", "-", input_text=secret_yaml(namespace, NEW_KEY))
        recreated = seconds_until("the re-created key in the runtime",
                                  lambda: endpoint_key(runtime, tenant) == NEW_KEY)
        log.info("re-creation reached the runtime in %.2f s", recreated)
        wait_for("the re-creation's Event", lambda: any(
            "created again" in m for m in changed_events(control_plane, tenant)), 30)
        wait_for("the label on the new Secret", lambda: ((get_json(
            control_plane, "secret", "model-key", "-n", namespace) or {})["metadata"].get(
            "labels") or {}).get(LABEL) == tenant, 30)
        assert call().content
        assert len(shared.received) == shared_before

        # Back to the shared endpoint: the label is removed, the Secret itself stays.
        apply_tenant(control_plane, tenant, plan="pro", apiKeys=[{"name": "app"}],
                     ai={"endpoint": {"type": "shared"}})
        wait_for("the label removed", lambda: LABEL not in ((get_json(
            control_plane, "secret", "model-key", "-n", namespace) or {})["metadata"].get(
            "labels") or {}), 60)
        after = get_json(control_plane, "secret", "model-key", "-n", namespace) or {}
        assert base64.b64decode(after["data"]["api-key"]).decode() == NEW_KEY
        delete_tenant(control_plane, tenant)
