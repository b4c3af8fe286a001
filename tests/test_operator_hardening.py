"""Hardening of the operator's Kubernetes side, through the real operator and API server.

Silo volumes that grow, credentials deleted by hand, a lowered isolation, cascading deletion,
objects the operator did not create, finalization that cannot reach its servers, and the
runtime config's revision when a TenantPlan changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from conftest import CREDENTIALS_NAMESPACE
from kube_helpers import (
    apply_tenant,
    condition,
    delete_tenant,
    get_json,
    tenant_status,
    wait_for,
    wait_ready,
)
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres, Redis
from tenantry_operator import database
from tenantry_runtime.contracts.database import bridge_role
from test_operator_dataplane import SILO_STORAGE, runtime_config, scalar, secret_data

pytestmark = pytest.mark.usefixtures("operator")


def claim_request(plane: ControlPlane, namespace: str) -> str | None:
    pvc = get_json(plane, "pvc", "data-postgres-0", "-n", namespace)
    return None if pvc is None else pvc["spec"]["resources"]["requests"]["storage"]


def events(plane: ControlPlane, tenant: str, reason: str) -> str:
    return plane.kubectl("get", "events", "-A", "--field-selector",
                         f"involvedObject.name={tenant},reason={reason}",
                         "-o", "jsonpath={.items[*].message}").stdout


def wait_reason(plane: ControlPlane, tenant: str, ctype: str, reason: str,
                timeout: float = 60) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(f"{tenant}: {ctype} {reason}", lambda: (
        condition(s := tenant_status(plane, tenant), ctype).get("reason") == reason and s),
        timeout)
    return status


def patch_tenant(plane: ControlPlane, tenant: str, spec: dict[str, Any]) -> None:
    plane.kubectl("patch", "tnt", tenant, "--type=merge", "-p", json.dumps({"spec": spec}))


# --- item 4: growing a silo's storage ---------------------------------------------------------


def test_growing_silo_storage_resizes_the_claim_and_keeps_applying(
    control_plane: ControlPlane,
) -> None:
    apply_tenant(control_plane, "silogrow", plan="enterprise", isolation="silo",
                 database=SILO_STORAGE, deletionPolicy="Delete")
    wait_ready(control_plane, "silogrow", timeout=120)
    ns = "tenant-silogrow"
    assert claim_request(control_plane, ns) == "5Gi"
    patch_tenant(control_plane, "silogrow", {"database": {"storage": {"size": "7Gi"}}})
    wait_for("the claim to grow", lambda: claim_request(control_plane, ns) == "7Gi", timeout=60)
    status = wait_for("Ready at generation 2", lambda: (
        (s := tenant_status(control_plane, "silogrow")).get("phase") == "Ready"
        and condition(s, "DatabaseReady").get("observedGeneration") == 2 and s), timeout=60)
    assert condition(status, "DatabaseReady")["status"] == "True"
    sts = get_json(control_plane, "statefulset", "postgres", "-n", ns) or {}
    # The claim template is immutable: it keeps the size the StatefulSet was created with.
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"][
        "storage"] == "5Gi"
    time.sleep(7)  # a few resyncs later: still applying without an error
    status = tenant_status(control_plane, "silogrow")
    assert status["phase"] == "Ready", status
    delete_tenant(control_plane, "silogrow")


FIXED_CLASS = """\
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fixed-size}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
reclaimPolicy: Retain
allowVolumeExpansion: false
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: fixed-size-pv}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: fixed-size
  hostPath: {path: /tmp/tenantry-fixed-size-pv}
"""


def test_storage_class_without_expansion_reports_a_condition(
    control_plane: ControlPlane,
) -> None:
    control_plane.kubectl("apply", "-f", "-", input_text=FIXED_CLASS)
    apply_tenant(control_plane, "silofixed", plan="enterprise", isolation="silo",
                 database={"storage": {"size": "5Gi", "storageClassName": "fixed-size"}},
                 deletionPolicy="Delete")
    wait_ready(control_plane, "silofixed", timeout=120)
    patch_tenant(control_plane, "silofixed", {"database": {"storage": {"size": "9Gi"}}})
    status = wait_reason(control_plane, "silofixed", "DatabaseReady",
                         "VolumeExpansionNotAllowed")
    message = condition(status, "DatabaseReady")["message"]
    assert "fixed-size" in message and "allowVolumeExpansion" in message
    assert status["phase"] == "Failed"
    assert claim_request(control_plane, "tenant-silofixed") == "5Gi"
    delete_tenant(control_plane, "silofixed")


# --- item 5: credentials deleted by hand ------------------------------------------------------


def test_deleted_credentials_come_back_with_the_same_password_or_are_reported_lost(
    control_plane: ControlPlane,
) -> None:
    apply_tenant(control_plane, "silocreds", plan="enterprise", isolation="silo",
                 database=SILO_STORAGE, deletionPolicy="Delete")
    wait_ready(control_plane, "silocreds", timeout=120)
    ns = "tenant-silocreds"
    admin = secret_data(control_plane, ns, "postgres-admin")
    login = secret_data(control_plane, ns, "tenant-db-credentials")
    control_plane.kubectl("delete", "secret", "--wait=false", "postgres-admin",
                          "tenant-db-credentials", "-n", ns)
    wait_for("both Secrets to come back", lambda: all(
        get_json(control_plane, "secret", name, "-n", ns)
        for name in ("postgres-admin", "tenant-db-credentials")), timeout=30)
    assert secret_data(control_plane, ns, "postgres-admin")["password"] == admin["password"]
    assert secret_data(control_plane, ns, "tenant-db-credentials")["password"] == login[
        "password"]

    # The copy gone too: the silo's data directory keeps the old password, so no new one.
    backup = "tenantry-silocreds.postgres-admin"

    def lost() -> dict[str, Any] | None:
        status = tenant_status(control_plane, "silocreds")
        if condition(status, "DatabaseReady").get("reason") == "CredentialsLost":
            return status
        # A resync between the two deletions may restore one from the other: delete again.
        control_plane.kubectl("delete", "secret", "--wait=false", backup, "-n",
                              CREDENTIALS_NAMESPACE, "--ignore-not-found")
        control_plane.kubectl("delete", "secret", "--wait=false", "postgres-admin", "-n", ns,
                              "--ignore-not-found")
        return None

    status = wait_for("CredentialsLost", lost, timeout=60)
    message = condition(status, "DatabaseReady")["message"]
    assert status["phase"] == "Failed"
    assert "ALTER ROLE postgres PASSWORD" in message and "kubectl create secret" in message
    time.sleep(7)  # resyncs later, still no generated password
    assert get_json(control_plane, "secret", "postgres-admin", "-n", ns) is None
    assert get_json(control_plane, "secret", backup, "-n", CREDENTIALS_NAMESPACE) is None

    # Following the message's advice brings the tenant back (and the copy with it).
    control_plane.kubectl("create", "secret", "generic", "postgres-admin", "-n", ns,
                          "--type=kubernetes.io/basic-auth", "--from-literal=username=postgres",
                          "--from-literal=password=recovered", "--from-literal=database=tenantry",
                          "--from-literal=host=postgres.tenant-silocreds.svc:5432")
    control_plane.kubectl("label", "secret", "postgres-admin", "-n", ns,
                          "app.kubernetes.io/managed-by=tenantry-operator",
                          "tenantry.dev/tenant=silocreds")
    wait_ready(control_plane, "silocreds", timeout=60)
    assert secret_data(control_plane, CREDENTIALS_NAMESPACE, backup)["password"] == "recovered"
    delete_tenant(control_plane, "silocreds")
    assert get_json(control_plane, "secret", backup, "-n", CREDENTIALS_NAMESPACE) is None


def test_a_lost_tenant_login_secret_gets_a_new_password_that_the_role_learns(
    control_plane: ControlPlane, postgres: Postgres,
) -> None:
    """Unlike the silo admin, the tenant's login is re-set through the admin connection."""
    apply_tenant(control_plane, "opregen", plan="pro", isolation="bridge",
                 deletionPolicy="Delete")
    wait_ready(control_plane, "opregen", timeout=90)
    ns, backup = "tenant-opregen", "tenantry-opregen.tenant-db-credentials"
    old = secret_data(control_plane, ns, "tenant-db-credentials")["password"]

    def regenerated() -> str | None:
        secret = get_json(control_plane, "secret", "tenant-db-credentials", "-n", ns)
        if secret is not None:
            new = secret_data(control_plane, ns, "tenant-db-credentials")["password"]
            if new != old:
                return new
        control_plane.kubectl("delete", "secret", "--wait=false", backup, "-n",
                              CREDENTIALS_NAMESPACE, "--ignore-not-found")
        control_plane.kubectl("delete", "secret", "--wait=false", "tenant-db-credentials", "-n", ns,
                              "--ignore-not-found")
        return None

    new = wait_for("a new login password", regenerated, timeout=60)
    dsn = postgres.dsn("tenantry", user=bridge_role("opregen"), password=new)
    wait_for("the role to take the new password", lambda: _can_login(dsn), timeout=30)
    delete_tenant(control_plane, "opregen")


def _can_login(dsn: str) -> bool:
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError:
        return False
    return True


# --- item 7: isolation lowered under Retain ---------------------------------------------------


def test_recreating_a_retained_bridge_tenant_as_pool_fails_without_provisioning(
    control_plane: ControlPlane, shared_database: str,
) -> None:
    apply_tenant(control_plane, "oplower", plan="pro", isolation="bridge")  # Retain
    wait_ready(control_plane, "oplower", timeout=90)
    delete_tenant(control_plane, "oplower")
    apply_tenant(control_plane, "oplower", plan="pro", isolation="pool")
    status = wait_reason(control_plane, "oplower", "DatabaseReady", "IsolationLowered")
    assert status["phase"] == "Failed"
    message = condition(status, "DatabaseReady")["message"]
    assert "spec.isolation to bridge" in message
    time.sleep(7)  # resyncs later: still nothing provisioned at pool
    status = tenant_status(control_plane, "oplower")
    assert status["phase"] == "Failed"
    assert "CollectionReady" not in {c["type"] for c in status["conditions"]}
    assert scalar(shared_database, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                  ("oplower",)) == "bridge"
    assert scalar(shared_database, "SELECT count(*) FROM pg_indexes WHERE indexname = %s",
                  ("emb_d384_oplower_hnsw",)) == 0
    # The retained namespace still holds the bridge config; nothing rewrote it to `shared`.
    assert runtime_config(control_plane, "oplower").database.kind == "schema"
    delete_tenant(control_plane, "oplower")


# --- item 8: cascading deletion ---------------------------------------------------------------


@contextlib.contextmanager
def redis_unreachable(redis_server: Redis) -> Iterator[None]:
    """Point the running operator at a closed port, then back at the real Redis."""
    from tenantry_operator.settings import get_settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["TENANTRY_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ["TENANTRY_REDIS_URL"] = redis_server.url
        get_settings.cache_clear()


@pytest.mark.parametrize(("cascade", "policy"), [
    ("background", "Retain"), ("foreground", "Retain"),
    ("background", "Delete"), ("foreground", "Delete"),
])
def test_cascading_deletion_follows_the_deletion_policy(
    control_plane: ControlPlane, redis_server: Redis, cascade: str, policy: str,
) -> None:
    name = f"casc{cascade[:2]}{policy[:3].lower()}"
    ns = f"tenant-{name}"
    apply_tenant(control_plane, name, plan="pro", isolation="bridge", deletionPolicy=policy)
    wait_ready(control_plane, name, timeout=90)
    # Hold the finalizer up for a while, so the garbage collector has time to act first.
    with redis_unreachable(redis_server):
        control_plane.kubectl("delete", "tnt", name, f"--cascade={cascade}", "--wait=false")
        time.sleep(8)
    wait_for(f"tenant {name} to disappear", lambda: get_json(control_plane, "tnt", name) is None,
             timeout=90)
    namespace = get_json(control_plane, "namespace", ns)
    if policy == "Retain":
        assert namespace is not None and namespace["status"]["phase"] == "Active"
        assert "metadata" in (get_json(control_plane, "secret", "tenant-db-credentials",
                                       "-n", ns) or {})
    else:
        assert namespace is None or namespace["status"]["phase"] == "Terminating"


def test_an_owner_reference_left_by_an_older_version_is_removed(
    control_plane: ControlPlane,
) -> None:
    apply_tenant(control_plane, "opowner", deletionPolicy="Delete")
    wait_ready(control_plane, "opowner")
    ns = "tenant-opowner"
    assert not (get_json(control_plane, "namespace", ns) or {})["metadata"].get(
        "ownerReferences")
    uid = (get_json(control_plane, "tnt", "opowner") or {})["metadata"]["uid"]
    owner = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "name": "opowner",
             "uid": uid, "controller": True, "blockOwnerDeletion": True}
    control_plane.kubectl("patch", "namespace", ns, "--type=merge", "-p",
                          json.dumps({"metadata": {"ownerReferences": [owner]}}))
    wait_for("the owner reference to go", lambda: not (
        get_json(control_plane, "namespace", ns) or {})["metadata"].get("ownerReferences"),
        timeout=30)
    delete_tenant(control_plane, "opowner")


# --- item 9: objects the operator did not create ----------------------------------------------


def test_a_namespace_created_by_someone_else_is_neither_adopted_nor_deleted(
    control_plane: ControlPlane,
) -> None:
    ns = "tenant-opforeign"
    control_plane.kubectl("create", "namespace", ns)
    control_plane.kubectl("create", "configmap", "theirs", "-n", ns, "--from-literal=a=b")
    apply_tenant(control_plane, "opforeign", deletionPolicy="Delete")
    apply_tenant(control_plane, "opneighbour", deletionPolicy="Delete")
    status = wait_reason(control_plane, "opforeign", "NamespaceReady", "NamespaceConflict")
    assert status["phase"] == "Failed"
    assert "was not created by Tenantry" in condition(status, "NamespaceReady")["message"]
    wait_ready(control_plane, "opneighbour")  # other tenants are unaffected
    labels = (get_json(control_plane, "namespace", ns) or {})["metadata"].get("labels") or {}
    assert "tenantry.dev/tenant" not in labels
    delete_tenant(control_plane, "opforeign")
    namespace = get_json(control_plane, "namespace", ns)
    assert namespace is not None and namespace["status"]["phase"] == "Active"
    assert get_json(control_plane, "configmap", "theirs", "-n", ns) is not None
    delete_tenant(control_plane, "opneighbour")
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def test_a_secret_created_by_someone_else_is_not_taken_over(
    control_plane: ControlPlane,
) -> None:
    """A namespace handed over by label, but holding a foreign Secret under the operator's name."""
    ns = "tenant-opsecret"
    control_plane.kubectl("create", "namespace", ns)
    control_plane.kubectl("label", "namespace", ns, "tenantry.dev/tenant=opsecret",
                          "app.kubernetes.io/managed-by=tenantry-operator")
    control_plane.kubectl("create", "secret", "generic", "tenant-db-credentials", "-n", ns,
                          "--from-literal=password=theirs")
    apply_tenant(control_plane, "opsecret", plan="pro", isolation="bridge",
                 deletionPolicy="Delete")
    status = wait_reason(control_plane, "opsecret", "DatabaseReady", "ResourceConflict")
    assert status["phase"] == "Failed"
    assert secret_data(control_plane, ns, "tenant-db-credentials") == {"password": "theirs"}
    delete_tenant(control_plane, "opsecret")


# --- item 19: finalization that cannot reach its servers --------------------------------------


def test_finalization_waits_for_redis_until_forced_with_a_reason(
    control_plane: ControlPlane, redis_server: Redis,
) -> None:
    apply_tenant(control_plane, "opblocked", deletionPolicy="Delete")
    wait_ready(control_plane, "opblocked")
    with redis_unreachable(redis_server):
        blocked_then_forced(control_plane)


def blocked_then_forced(control_plane: ControlPlane) -> None:
    control_plane.kubectl("delete", "tnt", "opblocked", "--wait=false")
    status = wait_reason(control_plane, "opblocked", "Finalized", "CleanupBlocked", timeout=60)
    assert "tenantry.dev/force-finalize" in condition(status, "Finalized")["message"]
    wait_for("a FinalizationBlocked Event",
             lambda: "Redis" in events(control_plane, "opblocked", "FinalizationBlocked"))
    time.sleep(6)  # retried, still blocked
    assert get_json(control_plane, "tnt", "opblocked") is not None
    control_plane.kubectl("annotate", "tnt", "opblocked",
                          "tenantry.dev/force-finalize=redis decommissioned, ticket OPS-42")
    wait_for("the forced deletion", lambda: get_json(control_plane, "tnt", "opblocked") is None,
             timeout=120)
    assert "OPS-42" in events(control_plane, "opblocked", "ForcedFinalization")
    assert get_json(control_plane, "namespace", "tenant-opblocked") is None or (
        get_json(control_plane, "namespace", "tenant-opblocked") or {}
    )["status"]["phase"] == "Terminating"


def test_retain_locks_out_a_role_even_without_a_recorded_location(
    control_plane: ControlPlane, shared_database: str, postgres: Postgres,
) -> None:
    """A crash after the role was created, before status recorded it: the role still locks."""
    body = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "opnoloc"}, "spec": {"planRef": {"name": "nosuchplan"}}}
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(body))
    wait_reason(control_plane, "opnoloc", "PlanResolved", "PlanNotFound")
    with psycopg.connect(shared_database, autocommit=True) as admin:
        # What the operator had done before the crash: role (registered as its own) and schema.
        database.ensure_bridge_tenant(admin, "opnoloc", "left-behind")
    try:
        assert "databaseLocation" not in tenant_status(control_plane, "opnoloc").get(
            "provisioned", {})
        delete_tenant(control_plane, "opnoloc")
        assert scalar(shared_database, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
                      (bridge_role("opnoloc"),)) is False
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            psycopg.connect(postgres.dsn("tenantry", user=bridge_role("opnoloc"),
                                         password="left-behind"))
    finally:
        with psycopg.connect(shared_database, autocommit=True) as admin:
            database.drop_bridge(admin, "opnoloc")


# --- item 21: the runtime config's revision follows its content -------------------------------


def limits_revision(redis_server: Redis, tenant: str) -> int:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    return int(client.hget(f"tenantry:v1:{{{tenant}}}:limits", "revision") or -1)


def test_a_plan_edit_grows_the_revision_and_a_settled_resync_does_not(
    control_plane: ControlPlane, redis_server: Redis,
) -> None:
    def plan(model: str, daily: int) -> str:
        return json.dumps({"apiVersion": "tenantry.dev/v1alpha1", "kind": "TenantPlan",
                           "metadata": {"name": "revplan"},
                           "spec": {"model": model, "budgets": {"dailyTokens": daily}}})

    control_plane.kubectl("apply", "-f", "-", input_text=plan("claude-haiku-4-5", 1000))
    apply_tenant(control_plane, "oprev", plan="revplan", deletionPolicy="Delete")
    wait_ready(control_plane, "oprev")
    time.sleep(7)  # settled: resyncs ran
    first = runtime_config(control_plane, "oprev").revision
    assert limits_revision(redis_server, "oprev") == first
    time.sleep(7)
    assert runtime_config(control_plane, "oprev").revision == first
    assert limits_revision(redis_server, "oprev") == first

    control_plane.kubectl("apply", "-f", "-", input_text=plan("claude-sonnet-4-5", 2000))
    config = wait_for("the new model", lambda: (
        (c := runtime_config(control_plane, "oprev")).model == "claude-sonnet-4-5" and c))
    assert config.revision > first
    wait_for("the new limits", lambda: redis.Redis.from_url(
        redis_server.url, decode_responses=True).hget("tenantry:v1:{oprev}:limits",
                                                      "daily_tokens") == "2000")
    assert limits_revision(redis_server, "oprev") == config.revision
    # The status is patched after the writes it records (a moment later, under load).
    wait_for("the revision in status", lambda: tenant_status(
        control_plane, "oprev")["runtimeConfig"]["revision"] == config.revision)
    time.sleep(7)  # settled again: no growth
    assert runtime_config(control_plane, "oprev").revision == config.revision
    assert limits_revision(redis_server, "oprev") == config.revision
    delete_tenant(control_plane, "oprev")
    control_plane.kubectl("delete", "tenantplan", "revplan")
