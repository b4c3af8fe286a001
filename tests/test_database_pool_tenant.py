"""provision_pool_tenant: a pool tenant's registry row and collection on one connection, one
read-only query when settled, and every drift the folded checks must still see."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from db_helpers import connect, scalar, scratch_database, unique
from psycopg import sql
from tenantry_devenv.services import Postgres
from tenantry_operator.database import (
    CollectionRequest,
    bootstrap_shared,
    ensure_pool_tenant,
    pool_index_name,
    provision_pool_tenant,
)
from tenantry_runtime.contracts.database import APP_ROLE, SHARED_SCHEMA

Conn = psycopg.Connection[Any]
DIMS = 5
REQUEST = CollectionRequest(DIMS, 8, 32, "shared")
TABLE = f"{SHARED_SCHEMA}.tenant_embeddings_d{DIMS}"


@pytest.fixture(scope="module")
def admin(postgres: Postgres) -> Iterator[Conn]:
    with scratch_database(postgres, "pooltenant") as db, connect(postgres, db) as conn:
        bootstrap_shared(conn)
        yield conn


def next_xid(conn: Conn) -> str:
    return str(scalar(conn, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


class Statements:
    """Counts the statements sent on `conn` (psycopg's cursor execute)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        execute = psycopg.Cursor.execute

        def counted(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            self.sent.append(query.as_string(cursor) if hasattr(query, "as_string")
                             else str(query))
            return execute(cursor, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", counted)


def registry_row(conn: Conn, tenant: str) -> tuple[Any, ...] | None:
    return conn.execute(sql.SQL("SELECT isolation, state FROM {} WHERE tenant_id = %s").format(
        sql.Identifier(SHARED_SCHEMA, "tenants")), (tenant,)).fetchone()


def test_creates_then_settles_in_one_read_only_query(
        admin: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = unique("p")
    made = provision_pool_tenant(admin, tenant, REQUEST)
    assert (made.recorded, made.collection) == (None, TABLE)
    assert registry_row(admin, tenant) == ("pool", "active")
    before = next_xid(admin)
    statements = Statements(monkeypatch)
    settled = provision_pool_tenant(admin, tenant, REQUEST)
    assert (settled.recorded, settled.collection) == ("pool", TABLE)
    assert len(statements.sent) == 1, statements.sent
    assert next_xid(admin) == before  # nothing written, not even a lock row


def test_rag_disabled_touches_no_collection(admin: Conn) -> None:
    tenant = unique("p")
    assert provision_pool_tenant(admin, tenant, None).collection is None
    assert registry_row(admin, tenant) == ("pool", "active")


def test_a_higher_isolation_is_reported_and_nothing_written(admin: Conn) -> None:
    tenant = unique("p")
    ensure_pool_tenant(admin, tenant, "bridge")
    before = next_xid(admin)
    found = provision_pool_tenant(admin, tenant, REQUEST)
    assert (found.recorded, found.collection) == ("bridge", None)
    assert registry_row(admin, tenant) == ("bridge", "active")
    assert next_xid(admin) == before


def test_a_retained_row_becomes_active_again(admin: Conn) -> None:
    tenant = unique("p")
    provision_pool_tenant(admin, tenant, REQUEST)
    with admin.transaction():
        admin.execute(sql.SQL("UPDATE {} SET state = 'retained' WHERE tenant_id = %s").format(
            sql.Identifier(SHARED_SCHEMA, "tenants")), (tenant,))
    assert provision_pool_tenant(admin, tenant, REQUEST).recorded == "pool"
    assert registry_row(admin, tenant) == ("pool", "active")


@pytest.mark.parametrize("drift", [
    f"REVOKE INSERT ON {TABLE} FROM {APP_ROLE}",
    f"GRANT TRUNCATE ON {TABLE} TO {APP_ROLE}",
    f"REVOKE USAGE ON SCHEMA {SHARED_SCHEMA} FROM {APP_ROLE}",
    f"ALTER TABLE {TABLE} NO FORCE ROW LEVEL SECURITY",
    f"DROP INDEX {SHARED_SCHEMA}.{pool_index_name(DIMS, None)}",
])
def test_every_folded_check_sees_its_drift(admin: Conn, drift: str) -> None:
    """Each check of the one query must fail on its own drift, or the drift would stay."""
    provision_pool_tenant(admin, unique("p"), REQUEST)
    admin.execute(drift)
    tenant = unique("p")
    provision_pool_tenant(admin, tenant, REQUEST)
    privileges = scalar(admin, "SELECT array_agg(p ORDER BY p) FROM unnest(ARRAY['SELECT',"
                        " 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p"
                        " WHERE has_table_privilege(%s, %s, p)", (APP_ROLE, TABLE))
    assert privileges == ["DELETE", "INSERT", "SELECT", "UPDATE"]
    assert scalar(admin, "SELECT has_schema_privilege(%s, %s, 'USAGE')",
                  (APP_ROLE, SHARED_SCHEMA))
    assert scalar(admin, "SELECT relforcerowsecurity FROM pg_class WHERE oid = %s::regclass",
                  (TABLE,))
    assert scalar(admin, "SELECT to_regclass(%s) IS NOT NULL",
                  (f"{SHARED_SCHEMA}.{pool_index_name(DIMS, None)}",))
    # And now it is settled again: one query.
    before = next_xid(admin)
    provision_pool_tenant(admin, tenant, REQUEST)
    assert next_xid(admin) == before


def test_a_partial_index_tenant_gets_its_own_index(admin: Conn) -> None:
    tenant = unique("p")
    request = CollectionRequest(DIMS, 8, 32, "partial")
    assert provision_pool_tenant(admin, tenant, request).collection == TABLE
    name = pool_index_name(DIMS, tenant)
    assert scalar(admin, "SELECT to_regclass(%s) IS NOT NULL", (f"{SHARED_SCHEMA}.{name}",))
    before = next_xid(admin)
    provision_pool_tenant(admin, tenant, request)
    assert next_xid(admin) == before
    # Other parameters for its own index: rebuilt (its own, so it follows the spec).
    provision_pool_tenant(admin, tenant, CollectionRequest(DIMS, 10, 40, "partial"))
    assert scalar(admin, "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                  (f"{SHARED_SCHEMA}.{name}",)) == ["m=10", "ef_construction=40"]


def test_not_bootstrapped_says_so(postgres: Postgres) -> None:
    with scratch_database(postgres, "bare") as db, connect(postgres, db) as conn, \
            pytest.raises(RuntimeError, match="bootstrap_shared"):
        provision_pool_tenant(conn, unique("p"), REQUEST)
