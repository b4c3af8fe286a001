"""Tenant API keys end to end: Tenant YAML -> operator -> runtime -> model -> usage row.

The in-process operator against the real control plane writes each tenant's keys into the
tenant's Secret and the runtime's copy into the runtime's namespace; a runtime under uvicorn
reads that copy through its Kubernetes source (list + watch); the official anthropic SDK calls
it with the key read back from the tenant's Secret; the stub upstream answers; usage lands in
ai_usage_logs of the shared database.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import psycopg
import pytest
from conftest import RUNTIME_NAMESPACE
from kube_helpers import (
    apply_tenant,
    condition,
    delete_tenant,
    get_json,
    tenant_status,
    wait_for,
    wait_ready,
)
from psycopg.conninfo import conninfo_to_dict
from runtime_helpers import UPSTREAM_KEY, KubeRuntime
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres
from tenantry_runtime.api_keys import KEY_PREFIX, prefix_of
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import bridge_role

pytestmark = [pytest.mark.usefixtures("operator"), pytest.mark.timeout(300)]

PLAN = "pro"
MODEL = "claude-sonnet-4-6"  # the pro plan's model
KEYS_SECRET = "tenantry-api-keys"


def keys_of(plane: ControlPlane, tenant: str) -> dict[str, str]:
    """The plaintext keys in the tenant's Secret, by name."""
    secret = get_json(plane, "secret", KEYS_SECRET, "-n", f"tenant-{tenant}") or {}
    return {name: base64.b64decode(value).decode()
            for name, value in (secret.get("data") or {}).items()}


def runtime_copy(plane: ControlPlane, tenant: str) -> dict[str, Any] | None:
    return get_json(plane, "secret", runtime_record.secret_name(tenant), "-n", RUNTIME_NAMESPACE)


def create(plane: ControlPlane, tenant: str, keys: list[dict[str, str]], **spec: Any) -> None:
    apply_tenant(plane, tenant, plan=PLAN, apiKeys=keys, **spec)


def call(runtime: KubeRuntime, key: str) -> anthropic.types.Message:
    client = anthropic.Anthropic(base_url=runtime.url, api_key=key, max_retries=0)
    return client.messages.create(model=MODEL, max_tokens=16,
                                  messages=[{"role": "user", "content": "hello"}])


def refused(runtime: KubeRuntime, key: str) -> bool:
    try:
        call(runtime, key)
    except anthropic.AuthenticationError:
        return True
    return False


def wait_served(runtime: KubeRuntime, key: str, tenant: str, timeout: float = 30) -> None:
    """Until the runtime's store authenticates `key` as `tenant` (the watch delivered it)."""
    wait_for(f"the runtime to serve a key of {tenant}", lambda: (
        (caller := runtime.store.authenticate(key)) is not None
        and caller.config.tenant == tenant), timeout)


def seconds_until_refused(runtime: KubeRuntime, key: str, timeout: float = 20) -> float:
    started = time.monotonic()
    wait_for("the key to be refused with 401", lambda: refused(runtime, key), timeout)
    return time.monotonic() - started


def usage_row(dsn: str, request_id: str) -> tuple[str, str, int, int] | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT tenant_id, model, input_tokens, output_tokens FROM tenantry.ai_usage_logs"
            " WHERE request_id = %s", (request_id,)).fetchone()
    return (row[0], row[1], row[2], row[3]) if row else None


def test_key_from_the_tenant_secret_calls_the_model_and_usage_is_metered(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime,
        shared_database: str) -> None:
    runtime = kube_runtime_server
    create(control_plane, "keyone", [{"name": "app"}])
    status = wait_ready(control_plane, "keyone")
    assert condition(status, "ApiKeysReady")["status"] == "True"
    assert condition(status, "RuntimeRecordReady")["status"] == "True"
    key = keys_of(control_plane, "keyone")["app"]
    assert prefix_of(key) is not None
    # Only hashes reach the runtime's copy, the Tenant and its status; never the key.
    copy = runtime_copy(control_plane, "keyone")
    assert copy is not None
    payload = json.loads(base64.b64decode(copy["data"][runtime_record.DATA_KEY]))
    assert [k["name"] for k in payload["api_keys"]] == ["app"]
    assert payload["api_keys"][0]["prefix"] == prefix_of(key)
    tenant_obj = json.dumps(get_json(control_plane, "tnt", "keyone"))
    assert key not in json.dumps(payload) and key not in tenant_obj
    # The secret part alone: token_urlsafe may itself hold "-", so cut after the prefix.
    secret = key.removeprefix(f"{KEY_PREFIX}{prefix_of(key)}-")
    assert len(secret) >= 40 and secret not in tenant_obj

    wait_served(runtime, key, "keyone")
    message = call(runtime, key)
    assert message.content and message.model == MODEL
    request_id = str(message._request_id)
    wait_for("the usage row", lambda: usage_row(shared_database, request_id), 30)
    tenant, model, input_tokens, output_tokens = usage_row(shared_database, request_id) or ()
    assert (tenant, model) == ("keyone", MODEL)
    assert input_tokens > 0 and output_tokens > 0


def test_a_key_authenticates_only_its_own_tenant(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime,
        shared_database: str) -> None:
    runtime = kube_runtime_server
    create(control_plane, "keyxa", [{"name": "app"}])
    create(control_plane, "keyxb", [{"name": "app"}])
    wait_ready(control_plane, "keyxa")
    wait_ready(control_plane, "keyxb")
    key_a, key_b = keys_of(control_plane, "keyxa")["app"], keys_of(control_plane, "keyxb")["app"]
    assert key_a != key_b and prefix_of(key_a) != prefix_of(key_b)
    wait_served(runtime, key_a, "keyxa")
    wait_served(runtime, key_b, "keyxb")
    request_id = str(call(runtime, key_a)._request_id)
    wait_for("the usage row", lambda: usage_row(shared_database, request_id), 30)
    assert (usage_row(shared_database, request_id) or ())[0] == "keyxa"
    # A's prefix with B's secret part, and the reverse: neither tenant's key.
    secret_a, secret_b = key_a.rsplit("-", 1)[1], key_b.rsplit("-", 1)[1]
    for forged in (key_a.replace(secret_a, secret_b), key_b.replace(secret_b, secret_a)):
        assert runtime.store.authenticate(forged) is None
        assert refused(runtime, forged)


def test_rotation_without_downtime_then_removal_revokes_within_seconds(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime) -> None:
    runtime = kube_runtime_server
    create(control_plane, "keyrot", [{"name": "old"}])
    wait_ready(control_plane, "keyrot")
    old = keys_of(control_plane, "keyrot")["old"]
    wait_served(runtime, old, "keyrot")

    create(control_plane, "keyrot", [{"name": "old"}, {"name": "new"}])
    wait_for("the new key", lambda: "new" in keys_of(control_plane, "keyrot"), 30)
    keys = keys_of(control_plane, "keyrot")
    assert keys["old"] == old  # never regenerated while its entry exists
    wait_served(runtime, keys["new"], "keyrot")
    assert call(runtime, old).content and call(runtime, keys["new"]).content

    create(control_plane, "keyrot", [{"name": "new"}])
    waited = seconds_until_refused(runtime, old)
    assert waited < 10, f"the removed key still worked {waited:.1f}s later"
    assert call(runtime, keys["new"]).content
    assert keys_of(control_plane, "keyrot") == {"new": keys["new"]}  # the old plaintext is gone


def test_key_stops_working_when_it_expires(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime) -> None:
    runtime = kube_runtime_server
    create(control_plane, "keyexp", [{"name": "long"}])
    wait_ready(control_plane, "keyexp")
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=8)
    create(control_plane, "keyexp", [{"name": "long"}, {
        "name": "short", "expiresAt": expires.isoformat().replace("+00:00", "Z")}])
    wait_for("the short key", lambda: "short" in keys_of(control_plane, "keyexp"), 30)
    short = keys_of(control_plane, "keyexp")["short"]
    wait_served(runtime, short, "keyexp")
    assert datetime.now(UTC) < expires
    assert call(runtime, short).content
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    assert refused(runtime, short)
    assert call(runtime, keys_of(control_plane, "keyexp")["long"]).content


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_deleted_tenant_keys_stop_working(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime, policy: str) -> None:
    runtime = kube_runtime_server
    tenant = f"keydel{policy.lower()}"
    create(control_plane, tenant, [{"name": "app"}], deletionPolicy=policy)
    wait_ready(control_plane, tenant)
    key = keys_of(control_plane, tenant)["app"]
    wait_served(runtime, key, tenant)
    assert call(runtime, key).content
    delete_tenant(control_plane, tenant)
    assert refused(runtime, key)
    assert runtime.store.get(tenant) is None
    assert runtime_copy(control_plane, tenant) is None
    if policy == "Retain":
        # The kept namespace keeps no live-looking key, and a Tenant created again under this
        # name gets a new key instead of reviving the revoked one.
        assert keys_of(control_plane, tenant) == {}
        create(control_plane, tenant, [{"name": "app"}], deletionPolicy="Delete")
        wait_ready(control_plane, tenant)
        again = keys_of(control_plane, tenant)["app"]
        assert again != key
        wait_served(runtime, again, tenant)
        assert refused(runtime, key)
        delete_tenant(control_plane, tenant)


def test_plaintext_deleted_by_hand_reissues_the_key_and_revokes_the_old_one(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime) -> None:
    runtime = kube_runtime_server
    create(control_plane, "keylost", [{"name": "app"}, {"name": "other"}])
    wait_ready(control_plane, "keylost")
    before = keys_of(control_plane, "keylost")
    wait_served(runtime, before["app"], "keylost")
    control_plane.kubectl("patch", "secret", KEYS_SECRET, "-n", "tenant-keylost", "--type=json",
                          "-p", '[{"op": "remove", "path": "/data/app"}]')
    # The resync (every 3 s in tests) issues a new key for the name; the old one is revoked.
    wait_for("a new key for app", lambda: keys_of(control_plane, "keylost").get(
        "app") not in (None, before["app"]), 30)
    after = keys_of(control_plane, "keylost")
    assert after["other"] == before["other"]
    wait_served(runtime, after["app"], "keylost")
    assert refused(runtime, before["app"])
    assert call(runtime, after["app"]).content and call(runtime, after["other"]).content


def test_settled_resync_writes_nothing_and_a_deleted_copy_comes_back(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime) -> None:
    runtime = kube_runtime_server
    create(control_plane, "keyidle", [{"name": "app"}])
    wait_ready(control_plane, "keyidle")
    key = keys_of(control_plane, "keyidle")["app"]
    wait_served(runtime, key, "keyidle")

    def versions() -> tuple[str, str]:
        copy = runtime_copy(control_plane, "keyidle") or {}
        keys = get_json(control_plane, "secret", KEYS_SECRET, "-n", "tenant-keyidle") or {}
        return (copy.get("metadata", {}).get("resourceVersion", ""),
                keys.get("metadata", {}).get("resourceVersion", ""))

    first = versions()
    time.sleep(8)  # more than two resyncs of 3 s
    assert versions() == first
    # Someone deletes the runtime's copy: the tenant drops out, the resync restores it.
    control_plane.kubectl("delete", "secret", "--wait=false",
                          runtime_record.secret_name("keyidle"), "-n", RUNTIME_NAMESPACE)
    wait_for("the runtime to drop the tenant", lambda: runtime.store.get("keyidle") is None, 10)
    wait_served(runtime, key, "keyidle")
    assert keys_of(control_plane, "keyidle")["app"] == key


def record_payload(plane: ControlPlane, tenant: str) -> dict[str, Any]:
    copy = runtime_copy(plane, tenant) or {}
    payload: dict[str, Any] = json.loads(base64.b64decode(
        (copy.get("data") or {}).get(runtime_record.DATA_KEY, "e30=")))
    return payload


def test_dedicated_endpoint_key_comes_from_the_tenant_secret(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime,
        upstream_stub: tuple[str, object]) -> None:
    runtime, (stub_url, _) = kube_runtime_server, upstream_stub
    create(control_plane, "keyded", [{"name": "app"}], ai={"endpoint": {
        "type": "dedicated", "url": stub_url, "secretRef": {"name": "model-key"}}})
    # No endpoint Secret yet: the record is written (keys work), the condition says what is
    # missing, and the runtime refuses with 503 rather than falling back to the shared endpoint.
    wait_for("EndpointKeyMissing", lambda: condition(
        tenant_status(control_plane, "keyded"), "RuntimeRecordReady").get(
        "reason") == "EndpointKeyMissing", 60)
    key = keys_of(control_plane, "keyded")["app"]
    wait_served(runtime, key, "keyded")
    with pytest.raises(anthropic.InternalServerError) as unconfigured:
        call(runtime, key)
    assert unconfigured.value.status_code == 503
    control_plane.kubectl("create", "secret", "generic", "model-key", "-n", "tenant-keyded",
                          f"--from-literal=api-key={UPSTREAM_KEY}")
    wait_ready(control_plane, "keyded")
    wait_for("the endpoint key in the runtime", lambda: (
        (rec := runtime.store.get("keyded")) is not None and rec.endpoint_api_key is not None
        and rec.endpoint_api_key.get_secret_value() == UPSTREAM_KEY), 30)
    assert call(runtime, key).content
    # The key is in the runtime's Secret only, never in the tenant's ConfigMap.
    configmap = json.dumps(get_json(control_plane, "configmap", "tenantry-runtime-config", "-n",
                                    "tenant-keyded"))
    assert UPSTREAM_KEY not in configmap
    delete_tenant(control_plane, "keyded")


def test_bridge_tenant_record_carries_a_working_login_dsn(
        control_plane: ControlPlane, postgres: Postgres) -> None:
    create(control_plane, "keybridge", [{"name": "app"}], isolation="bridge",
           deletionPolicy="Delete")
    wait_ready(control_plane, "keybridge", timeout=90)
    payload = record_payload(control_plane, "keybridge")
    assert payload["config"]["database"]["kind"] == "schema"
    fields = conninfo_to_dict(payload["database_dsn"])
    assert fields["user"] == bridge_role("keybridge") and fields["dbname"] == "tenantry"
    # The runtime reaches Postgres by its in-cluster name; here the test server stands in.
    with psycopg.connect(postgres.dsn("tenantry", user=str(fields["user"]),
                                      password=str(fields["password"]))) as conn:
        assert conn.execute("SELECT session_user").fetchone() == (bridge_role("keybridge"),)
    delete_tenant(control_plane, "keybridge")


def test_plan_tier_and_budget_fail_open_reach_the_runtime_and_follow_a_plan_edit(
        control_plane: ControlPlane, kube_runtime_server: KubeRuntime) -> None:
    runtime = kube_runtime_server
    plan = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "TenantPlan",
            "metadata": {"name": "tierprobe"},
            "spec": {"model": MODEL, "tier": 3}}
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(plan))
    apply_tenant(control_plane, "keytier", plan="tierprobe", apiKeys=[{"name": "app"}])
    wait_ready(control_plane, "keytier")
    key = keys_of(control_plane, "keytier")["app"]
    wait_served(runtime, key, "keytier")
    record = runtime.store.get("keytier")
    assert record is not None
    assert (record.plan_tier, record.budget_fail_open) == (3, False)
    assert record.max_concurrent_requests is None  # the runtime's own default applies
    revision = record.config.revision
    # A TenantPlan edit (no new Tenant generation) reaches the runtime at a grown revision.
    plan["spec"] = {"model": MODEL, "tier": 5, "budgets": {"failOpen": True},
                    "maxConcurrentRequests": 7}
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(plan))
    wait_for("the plan edit in the runtime", lambda: (
        (rec := runtime.store.get("keytier")) is not None
        and (rec.plan_tier, rec.budget_fail_open, rec.max_concurrent_requests) == (5, True, 7)),
        30)
    updated = runtime.store.get("keytier")
    assert updated is not None and updated.config.revision > revision
    delete_tenant(control_plane, "keytier")
    control_plane.kubectl("delete", "tenantplan", "tierprobe", "--wait=false")
