"""The operator provisions the data plane for real: Postgres (shared and silo), Redis, ConfigMaps.

Runs the operator in-process against the real control plane, embedded Postgres with pgvector
(a second server stands in for the silo Pods' databases, see conftest) and redis-server.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from kube_helpers import (
    apply_tenant,
    condition,
    delete_tenant,
    get_json,
    tenant_status,
    wait_for,
    wait_ready,
)
from pgvector.psycopg import register_vector
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres, Redis
from tenantry_runtime.contracts.database import bridge_role, bridge_schema, tenant_transaction
from tenantry_runtime.contracts.redis_keys import DOCUMENT_OWNERS, TenantKeys
from tenantry_runtime.contracts.runtime_config import TenantRuntimeConfig

pytestmark = pytest.mark.usefixtures("operator")
SILO_STORAGE = {"storage": {"size": "5Gi"}}


def scalar(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def runtime_config(plane: ControlPlane, tenant: str) -> TenantRuntimeConfig:
    cm = get_json(plane, "configmap", "tenantry-runtime-config", "-n", f"tenant-{tenant}")
    assert cm is not None, f"no runtime ConfigMap for {tenant}"
    return TenantRuntimeConfig.model_validate_json(cm["data"]["config.json"])


def secret_data(plane: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    secret = get_json(plane, "secret", name, "-n", namespace)
    assert secret is not None, f"no Secret {namespace}/{name}"
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def seed_tenant_data(dsn: str, schema: str, table: str, tenant: str, rows: int) -> None:
    """Documents, embeddings, usage logs and a conversation, written as the tenant would."""
    now = datetime.now(UTC)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        with tenant_transaction(conn, tenant):
            for i in range(rows):
                doc = conn.execute(
                    f'INSERT INTO "{schema}".documents (tenant_id, title, content) '  # noqa: S608
                    "VALUES (%s, %s, %s) RETURNING id", (tenant, f"doc {i}", f"text {i}"),
                ).fetchone()
                assert doc is not None
                vec = [float((i * 7 + j) % 11) / 10 + 0.01 for j in range(384)]
                conn.execute(
                    f"INSERT INTO {table} (tenant_id, document_id, content, embedding) "  # noqa: S608
                    "VALUES (%s, %s, %s, %s::vector)", (tenant, doc[0], f"chunk {i}", str(vec)))
                conn.execute(
                    f'INSERT INTO "{schema}".ai_usage_logs (tenant_id, request_id, model, '  # noqa: S608
                    "input_tokens, output_tokens, created_at) VALUES (%s, %s, 'm', %s, %s, %s)",
                    (tenant, f"req-{i}", 10 + i, 5 + i, now))


def counts(dsn: str, schema: str, table: str, tenant: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn, tenant_transaction(conn, tenant):
        result = []
        for relation in (f'"{schema}".documents', table, f'"{schema}".ai_usage_logs'):
            row = conn.execute(f"SELECT count(*) FROM {relation} WHERE tenant_id = %s",  # noqa: S608
                               (tenant,)).fetchone()
            assert row is not None
            result.append(int(row[0]))
        return result[0], result[1], result[2]


def test_pool_tenant_gets_registry_row_collection_limits_and_config(
    control_plane: ControlPlane, shared_database: str, redis_server: Redis,
) -> None:
    apply_tenant(control_plane, "dppool", ai={"budgets": {"dailyTokens": 12345}},
                 deletionPolicy="Delete")
    status = wait_ready(control_plane, "dppool", timeout=90)
    for ctype in ("DatabaseReady", "CollectionReady", "LimitsReady", "RuntimeConfigReady"):
        assert condition(status, ctype)["status"] == "True", status
    assert status["provisioned"]["databaseLocation"] == "shared"
    assert status["provisioned"]["collectionTable"] == "tenantry.tenant_embeddings_d384"
    assert scalar(shared_database, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                  ("dppool",)) == "pool"
    assert scalar(shared_database, "SELECT count(*) FROM pg_indexes WHERE schemaname = 'tenantry'"
                  " AND indexname = 'tenant_embeddings_d384_hnsw'") == 1
    limits = redis.Redis.from_url(redis_server.url, decode_responses=True).hgetall(
        "tenantry:v1:{dppool}:limits")
    assert limits["daily_tokens"] == "12345"  # the tenant's own value
    assert limits["monthly_tokens"] == "200000"  # from the free plan
    assert limits["requests_per_minute"] == "10"
    config = runtime_config(control_plane, "dppool")
    assert config.database.kind == "shared"
    assert config.collection.shared is True
    assert config.model == "claude-haiku-4-5"
    assert config.redis_key_prefix == "tenantry:v1:{dppool}:"
    # Its documents in the runtime's shared registry (as POST /v1/documents writes them),
    # next to another tenant's.
    client = redis.Redis.from_url(redis_server.url)
    ids, other = [str(uuid.uuid4()) for _ in range(3)], str(uuid.uuid4())
    for tenant, registered in (("dppool", ids), ("dpother", [other])):
        for command in TenantKeys(tenant).register_documents(registered):
            client.execute_command(*command)

    delete_tenant(control_plane, "dppool")
    assert scalar(shared_database, "SELECT count(*) FROM tenantry.tenants WHERE tenant_id = %s",
                  ("dppool",)) == 0
    assert client.exists("tenantry:v1:{dppool}:limits") == 0
    # deletionPolicy Delete: its documents are gone, so are their registry entries.
    assert client.hmget(DOCUMENT_OWNERS, [*ids, other]) == [None, None, None, b"dpother"]
    assert client.exists(TenantKeys("dppool").documents) == 0
    client.delete(TenantKeys("dpother").documents)
    client.hdel(DOCUMENT_OWNERS, other)


def test_bridge_tenant_role_logs_in_with_its_secret_and_sees_only_its_schema(
    control_plane: ControlPlane, shared_database: str, postgres: Postgres,
) -> None:
    apply_tenant(control_plane, "dpbridge", plan="pro", isolation="bridge",
                 deletionPolicy="Delete")
    status = wait_ready(control_plane, "dpbridge", timeout=90)
    schema, role = bridge_schema("dpbridge"), bridge_role("dpbridge")
    assert status["provisioned"]["schema"] == schema
    assert status["provisioned"]["role"] == role
    assert status["provisioned"]["collectionTable"] == f"{schema}.embeddings"
    creds = secret_data(control_plane, "tenant-dpbridge", "tenant-db-credentials")
    assert creds["username"] == role
    tenant_dsn = postgres.dsn("tenantry", user=creds["username"], password=creds["password"])
    with psycopg.connect(tenant_dsn, autocommit=True) as conn, \
            tenant_transaction(conn, "dpbridge"):
        conn.execute(f"SELECT count(*) FROM {schema}.documents")  # noqa: S608
    with psycopg.connect(tenant_dsn, autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT count(*) FROM tenantry.documents")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.dsn("tenantry", user=creds["username"], password="wrong"))
    cm = get_json(control_plane, "configmap", "tenantry-runtime-config", "-n", "tenant-dpbridge")
    assert cm is not None and creds["password"] not in json.dumps(cm)  # never in a ConfigMap

    delete_tenant(control_plane, "dpbridge")
    assert scalar(shared_database, "SELECT count(*) FROM pg_roles WHERE rolname = %s",
                  (role,)) == 0
    assert scalar(shared_database, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                  (schema,)) == 0


def test_silo_tenant_gets_statefulset_and_its_database_is_migrated(
    control_plane: ControlPlane, silo_postgres: Postgres, shared_database: str,
) -> None:
    apply_tenant(control_plane, "silo1", plan="enterprise", isolation="silo",
                 dataResidency={"region": "eu-west"},
                 database={**SILO_STORAGE, "resources": {"requests": {"cpu": "250m"}}},
                 deletionPolicy="Retain")
    status = wait_ready(control_plane, "silo1", timeout=120)
    ns = "tenant-silo1"
    assert status["provisioned"]["statefulSet"] == "postgres"
    sts = get_json(control_plane, "statefulset", "postgres", "-n", ns)
    assert sts is not None and sts["status"]["readyReplicas"] == 1
    pod_spec = sts["spec"]["template"]["spec"]
    term = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["eu-west"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["containers"][0]["resources"]["requests"]["cpu"] == "250m"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"][
        "storage"] == "5Gi"
    pvc = get_json(control_plane, "pvc", "data-postgres-0", "-n", ns)
    assert pvc is not None and pvc["status"]["phase"] == "Bound"
    for kind, name in (("service", "postgres"), ("service", "postgres-hl"),
                       ("pdb", "postgres"), ("secret", "postgres-admin")):
        assert get_json(control_plane, kind, name, "-n", ns) is not None, (kind, name)
    silo_dsn, schema = silo_postgres.dsn("silo_silo1"), bridge_schema("silo1")
    assert scalar(silo_dsn, f"SELECT count(*) FROM {schema}.schema_migrations") >= 3  # noqa: S608
    assert scalar(silo_dsn, "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.embeddings",))
    assert scalar(shared_database, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                  ("silo1",)) == "silo"
    config = runtime_config(control_plane, "silo1")
    assert config.database.kind == "dedicated"
    assert config.database.host == "postgres.tenant-silo1.svc:5432"

    delete_tenant(control_plane, "silo1")  # Retain: login revoked, data and volumes kept
    assert get_json(control_plane, "pvc", "data-postgres-0", "-n", ns) is not None
    assert get_json(control_plane, "statefulset", "postgres", "-n", ns) is not None


def test_pool_to_bridge_upgrade_moves_every_row_and_switches_the_config(
    control_plane: ControlPlane, shared_database: str,
) -> None:
    apply_tenant(control_plane, "upbridge", plan="enterprise", deletionPolicy="Delete")
    wait_ready(control_plane, "upbridge", timeout=90)
    before = runtime_config(control_plane, "upbridge")
    shared_table = "tenantry.tenant_embeddings_d384"
    seed_tenant_data(shared_database, "tenantry", shared_table, "upbridge", rows=25)
    seed_tenant_data(shared_database, "tenantry", shared_table, "dpneighbor", rows=0)
    assert counts(shared_database, "tenantry", shared_table, "upbridge") == (25, 25, 25)

    control_plane.kubectl("patch", "tnt", "upbridge", "--type=merge",
                          "-p", '{"spec": {"isolation": "bridge"}}')
    status = wait_for("migration Done", lambda: (
        (s := tenant_status(control_plane, "upbridge")).get("migration", {}).get("step")
        == "Done" and s.get("phase") == "Ready" and s), timeout=120)
    migration = status["migration"]
    assert (migration["from"], migration["to"]) == ("pool", "bridge")
    assert migration["rowsTotal"] == 75 and migration["rowsCopied"] == 75
    schema = bridge_schema("upbridge")
    assert counts(shared_database, schema, f"{schema}.embeddings",
                  "upbridge") == (25, 25, 25)
    assert counts(shared_database, "tenantry", shared_table, "upbridge") == (0, 0, 0)
    assert scalar(shared_database, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                  ("upbridge",)) == "bridge"
    after = runtime_config(control_plane, "upbridge")
    assert after.database.kind == "schema"
    assert after.revision > before.revision
    delete_tenant(control_plane, "upbridge")


def test_bridge_to_silo_upgrade_moves_data_into_the_dedicated_database(
    control_plane: ControlPlane, shared_database: str, silo_postgres: Postgres,
) -> None:
    apply_tenant(control_plane, "upsilo", plan="enterprise", isolation="bridge",
                 deletionPolicy="Delete")
    wait_ready(control_plane, "upsilo", timeout=90)
    schema = bridge_schema("upsilo")
    seed_tenant_data(shared_database, schema, f"{schema}.embeddings", "upsilo", rows=10)
    control_plane.kubectl("patch", "tnt", "upsilo", "--type=merge", "-p", json.dumps(
        {"spec": {"isolation": "silo", "database": SILO_STORAGE}}))
    wait_for("migration Done", lambda: (
        (s := tenant_status(control_plane, "upsilo")).get("migration", {}).get("step")
        == "Done" and s.get("phase") == "Ready"), timeout=120)
    silo_dsn = silo_postgres.dsn("silo_upsilo")
    assert counts(silo_dsn, schema, f"{schema}.embeddings", "upsilo") == (10, 10, 10)
    assert scalar(shared_database, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                  (schema,)) == 0
    assert runtime_config(control_plane, "upsilo").database.kind == "dedicated"
    delete_tenant(control_plane, "upsilo")
    assert get_json(control_plane, "namespace", "tenant-upsilo") is None or (
        get_json(control_plane, "namespace", "tenant-upsilo") or {}
    )["status"]["phase"] == "Terminating"


def test_silo_delete_policy_removes_statefulset_volumes_and_registry(
    control_plane: ControlPlane, shared_database: str,
) -> None:
    apply_tenant(control_plane, "silodel", plan="enterprise", isolation="silo",
                 database=SILO_STORAGE, deletionPolicy="Delete")
    wait_ready(control_plane, "silodel", timeout=120)
    ns = "tenant-silodel"
    assert get_json(control_plane, "pvc", "data-postgres-0", "-n", ns) is not None
    delete_tenant(control_plane, "silodel")
    wait_for("the silo's volume claim to go", lambda: (
        (pvc := get_json(control_plane, "pvc", "data-postgres-0", "-n", ns)) is None
        or pvc["metadata"].get("deletionTimestamp")))
    assert scalar(shared_database, "SELECT count(*) FROM tenantry.tenants WHERE tenant_id = %s",
                  ("silodel",)) == 0
    events = control_plane.kubectl("get", "events", "-A", "--field-selector",
                                   "involvedObject.name=silodel,reason=Finalized").stdout
    assert "deleted the silo StatefulSet and its volumes" in events


def test_objects_removed_by_hand_are_restored_by_the_resync(
    control_plane: ControlPlane, shared_database: str, redis_server: Redis, postgres: Postgres,
) -> None:
    apply_tenant(control_plane, "dprepair", plan="pro", isolation="bridge",
                 deletionPolicy="Delete")
    wait_ready(control_plane, "dprepair", timeout=90)
    ns, schema, role = "tenant-dprepair", bridge_schema("dprepair"), bridge_role("dprepair")
    password = secret_data(control_plane, ns, "tenant-db-credentials")["password"]
    control_plane.kubectl("delete", "configmap", "tenantry-runtime-config", "-n", ns)
    redis.Redis.from_url(redis_server.url).delete("tenantry:v1:{dprepair}:limits")
    with psycopg.connect(shared_database, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")
    wait_for("the resync to restore everything", lambda: (
        get_json(control_plane, "configmap", "tenantry-runtime-config", "-n", ns) is not None
        and redis.Redis.from_url(redis_server.url).exists("tenantry:v1:{dprepair}:limits")
        and scalar(shared_database, "SELECT to_regclass(%s) IS NOT NULL",
                   (f"{schema}.embeddings",))), timeout=60)
    # The Secret stayed the source of truth: the restored role takes the same password.
    with psycopg.connect(postgres.dsn("tenantry", user=role, password=password),
                         autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    delete_tenant(control_plane, "dprepair")


def test_retain_revokes_login_and_records_where_the_data_is(
    control_plane: ControlPlane, shared_database: str, postgres: Postgres,
) -> None:
    apply_tenant(control_plane, "dpkeep", plan="pro", isolation="bridge")
    wait_ready(control_plane, "dpkeep", timeout=90)
    creds = secret_data(control_plane, "tenant-dpkeep", "tenant-db-credentials")
    schema = bridge_schema("dpkeep")
    seed_tenant_data(shared_database, schema, f"{schema}.embeddings", "dpkeep", 3)
    delete_tenant(control_plane, "dpkeep")
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        psycopg.connect(postgres.dsn("tenantry", user=creds["username"],
                                     password=creds["password"]))
    assert counts(shared_database, schema, f"{schema}.embeddings",
                  "dpkeep") == (3, 3, 3)
    events = control_plane.kubectl("get", "events", "-A", "--field-selector",
                                   "involvedObject.name=dpkeep,reason=Finalized").stdout
    assert schema in events and "documents=3" in events


def test_pool_to_silo_upgrade_skips_the_bridge_step(
    control_plane: ControlPlane, shared_database: str, silo_postgres: Postgres,
) -> None:
    apply_tenant(control_plane, "poolsilo", plan="enterprise", deletionPolicy="Delete")
    wait_ready(control_plane, "poolsilo", timeout=90)
    shared_table = "tenantry.tenant_embeddings_d384"
    seed_tenant_data(shared_database, "tenantry", shared_table, "poolsilo", rows=7)
    control_plane.kubectl("patch", "tnt", "poolsilo", "--type=merge", "-p", json.dumps(
        {"spec": {"isolation": "silo", "database": SILO_STORAGE}}))
    status = wait_for("migration Done", lambda: (
        (s := tenant_status(control_plane, "poolsilo")).get("migration", {}).get("step")
        == "Done" and s.get("phase") == "Ready" and s), timeout=120)
    assert (status["migration"]["from"], status["migration"]["to"]) == ("pool", "silo")
    silo_dsn, schema = silo_postgres.dsn("silo_poolsilo"), bridge_schema("poolsilo")
    assert counts(silo_dsn, schema, f"{schema}.embeddings", "poolsilo") == (7, 7, 7)
    assert counts(shared_database, "tenantry", shared_table, "poolsilo") == (0, 0, 0)
    assert scalar(shared_database, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                  ("poolsilo",)) == "silo"
    delete_tenant(control_plane, "poolsilo")
