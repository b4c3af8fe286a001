"""Isolation upgrades driven by the operator: a tenant's vectors move even with RAG disabled.

Runs the operator in-process against the real control plane, embedded Postgres and Redis.
"""

from __future__ import annotations

import json

import psycopg
import pytest
from db_helpers import q
from kube_helpers import apply_tenant, delete_tenant, tenant_status, wait_for, wait_ready
from tenantry_devenv.controlplane import ControlPlane
from tenantry_runtime.contracts.database import bridge_schema, tenant_transaction

pytestmark = pytest.mark.usefixtures("operator")


def vectors(dsn: str, table: str, tenant: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn, tenant_transaction(conn, tenant):
        return [(str(c), str(e)) for c, e in conn.execute(q(
            "SELECT content, embedding::text FROM {t} WHERE tenant_id = %s ORDER BY content",
            t=table), (tenant,)).fetchall()]


def test_upgrading_a_tenant_with_rag_disabled_keeps_its_embeddings(
    control_plane: ControlPlane, shared_database: str,
) -> None:
    tenant, shared_table = "ragoff", "tenantry.tenant_embeddings_d384"
    apply_tenant(control_plane, tenant, plan="enterprise", deletionPolicy="Delete")
    wait_ready(control_plane, tenant, timeout=90)
    with psycopg.connect(shared_database, autocommit=True) as conn, \
            tenant_transaction(conn, tenant):
        for i in range(4):
            conn.execute(q("INSERT INTO {t} (tenant_id, content, embedding)"
                           " VALUES (%s, %s, %s::vector)", t=shared_table),
                         (tenant, f"chunk {i}", str([i / 7 + 0.01] * 384)))
    before = vectors(shared_database, shared_table, tenant)
    assert len(before) == 4

    # RAG off and bridge isolation in one change: the vectors must still move, not vanish.
    control_plane.kubectl("patch", "tnt", tenant, "--type=merge", "-p", json.dumps(
        {"spec": {"isolation": "bridge", "rag": {"enabled": False}}}))
    status = wait_for("migration Done", lambda: (
        (s := tenant_status(control_plane, tenant)).get("migration", {}).get("step")
        == "Done" and s.get("phase") == "Ready" and s), timeout=120)
    assert status["migration"]["rowsCopied"] == 4
    # Online: at least the last round ran under the hold, whose length is shown.
    assert status["migration"]["deltaRounds"] >= 2
    assert status["migration"]["holdMilliseconds"] >= 0
    events = json.loads(control_plane.kubectl(
        "get", "events", "-n", "default", "-o", "json",
        f"--field-selector=involvedObject.name={tenant},involvedObject.kind=Tenant").stdout)
    reasons = [e["reason"] for e in events["items"]]
    assert {"UpgradeStarted", "UpgradeSwitched", "UpgradeFinished"} <= set(reasons), reasons
    assert vectors(shared_database, f"{bridge_schema(tenant)}.embeddings", tenant) == before
    assert vectors(shared_database, shared_table, tenant) == []
    delete_tenant(control_plane, tenant)
