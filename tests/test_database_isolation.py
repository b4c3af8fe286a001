"""The cross-tenant suite: RLS, bridge schemas, roles, hostile names, retain and delete."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest
from db_helpers import (
    Conn,
    connect,
    create_login_role,
    drop_roles,
    q,
    relation_exists,
    scalar,
    scratch_database,
    unique,
)
from psycopg import sql
from tenantry_devenv.services import Postgres
from tenantry_operator.database import (
    IsolationLowered,
    bootstrap_shared,
    delete_shared_rows,
    delete_tenant_data,
    drop_bridge,
    ensure_bridge_tenant,
    ensure_collection,
    ensure_pool_tenant,
    pool_index_name,
    retain_tenant,
    search_collection,
    search_sql,
    shared_embeddings_table,
    tenant_tables,
)
from tenantry_runtime.billing.invoices import close_invoice
from tenantry_runtime.billing.terms import BillingTerms
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    BILLING_TABLES,
    InvalidTenantId,
    bridge_role,
    bridge_schema,
    load_migrations,
    rollup_usage,
    set_tenant,
    tenant_transaction,
    validate_tenant_id,
)

DIMS = 3
SHARED_TABLES = ["ai_conversations", "ai_usage_logs", "billing_invoices", "documents",
                 "tenant_embeddings_d3", "tenants", "usage_daily"]
# One row for tenant %(t)s in each table; %(v)s is a vector literal for the embeddings tables.
INSERTS = {
    "tenants": "INSERT INTO {s}.tenants (tenant_id, isolation) VALUES (%(t)s, 'pool')",
    "documents": "INSERT INTO {s}.documents (tenant_id, title, content)"
                 " VALUES (%(t)s, 'doc', 'secret of ' || %(t)s)",
    "ai_conversations": "INSERT INTO {s}.ai_conversations (tenant_id, title, created_at)"
                        " VALUES (%(t)s, 'conv', %(at)s)",
    "ai_usage_logs": "INSERT INTO {s}.ai_usage_logs (tenant_id, request_id, created_at, model,"
                     " input_tokens) VALUES (%(t)s, gen_random_uuid()::text, %(at)s, 'm', 5)",
    # A month after the tenant's latest invoice (one invoice per tenant and month).
    "billing_invoices": "INSERT INTO {s}.billing_invoices (tenant_id, month, currency, total,"
                        " document) SELECT %(t)s, coalesce(max(month) + interval '1 month',"
                        " date '2026-01-01')::date, 'USD', 1, '{{}}'::jsonb"
                        " FROM {s}.billing_invoices WHERE tenant_id = %(t)s",
    "usage_daily": "INSERT INTO {s}.usage_daily (tenant_id, day, model, requests)"
                   " VALUES (%(t)s, current_date, gen_random_uuid()::text, 1)",
    "tenant_embeddings_d3": "INSERT INTO {s}.tenant_embeddings_d3 (tenant_id, content, embedding)"
                            " VALUES (%(t)s, 'chunk', %(v)s::vector) RETURNING id",
    "embeddings": "INSERT INTO {s}.embeddings (tenant_id, content, embedding)"
                  " VALUES (%(t)s, 'chunk', %(v)s::vector) RETURNING id",
}
HOSTILE = ["a; DROP TABLE tenantry.tenants; --", "A", "x'--", "tenant-", "-tenant", "a" * 41, "",
           "tenant_1", " a", "a\n", "é"]


def insert(conn: Conn, schema: str, table: str, tenant: str,
           vector: str = "[1,0,0]", at: datetime | None = None) -> Any:
    query = sql.SQL(INSERTS[table]).format(s=sql.Identifier(schema))
    return conn.execute(query, {"t": tenant, "v": vector, "at": at or datetime.now(UTC)})


@dataclass
class World:
    pg: Postgres
    db: str
    admin: Conn
    app_user: str
    app_password: str
    c: str  # bridge tenants (cluster-wide roles, hence unique names)
    d: str
    passwords: dict[str, str]
    a: str = "a"  # pool tenants
    b: str = "b"
    roles: list[str] = field(default_factory=list)
    ids: dict[str, list[Any]] = field(default_factory=dict)

    def app(self) -> Conn:
        return connect(self.pg, self.db, self.app_user, self.app_password)

    def bridge(self, tenant: str, password: str | None = None) -> Conn:
        return connect(self.pg, self.db, bridge_role(tenant),
                       password or self.passwords[tenant])

    def count(self, table: str, tenant: str) -> int:
        return int(scalar(self.admin, sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s")
                          .format(sql.Identifier(*table.split("."))), (tenant,)))

    def add_bridge(self, tenant: str) -> str:
        self.passwords[tenant] = secrets.token_urlsafe(12)
        self.roles.append(bridge_role(tenant))
        ensure_bridge_tenant(self.admin, tenant, self.passwords[tenant])
        ensure_pool_tenant(self.admin, tenant, "bridge")  # the registry row, as the operator does
        return tenant


@pytest.fixture(scope="module")
def world(postgres: Postgres) -> Iterator[World]:
    roles: list[str] = []
    try:
        with scratch_database(postgres, "iso") as db, connect(postgres, db) as admin:
            w = World(pg=postgres, db=db, admin=admin, app_user=unique("runtime"),
                      app_password=secrets.token_urlsafe(12), c=unique("c"), d=unique("d"),
                      passwords={}, roles=roles)
            roles.append(w.app_user)
            assert bootstrap_shared(admin) == [m.version for m in load_migrations()]
            create_login_role(admin, w.app_user, w.app_password, APP_ROLE)
            now = datetime.now(UTC)
            old = datetime(2001, 1, 1, tzinfo=UTC)  # lands in the DEFAULT partition
            vectors = {w.a: ["[1,0,0]", "[0.9,0.1,0]"], w.b: ["[0,1,0]", "[0,0.9,0.1]"]}
            for tenant in (w.a, w.b):
                ensure_pool_tenant(admin, tenant)
                assert ensure_collection(admin, tenant, "shared", DIMS, 8, 32) == (
                    "tenantry.tenant_embeddings_d3")
                with tenant_transaction(admin, tenant):
                    for table in ("documents", "usage_daily", "billing_invoices"):
                        insert(admin, "tenantry", table, tenant)
                    for table in ("ai_conversations", "ai_usage_logs"):
                        insert(admin, "tenantry", table, tenant, at=now)
                        insert(admin, "tenantry", table, tenant, at=old)
                    w.ids[tenant] = [
                        insert(admin, "tenantry", "tenant_embeddings_d3", tenant,
                               vector=v).fetchone()[0]
                        for v in vectors[tenant]]
            for tenant in (w.c, w.d):
                w.add_bridge(tenant)
                assert ensure_collection(admin, tenant, "schema", DIMS, 8, 32) == (
                    f"{bridge_schema(tenant)}.embeddings")
                with w.bridge(tenant) as conn, tenant_transaction(conn, tenant):
                    insert(conn, bridge_schema(tenant), "documents", tenant)
                    insert(conn, bridge_schema(tenant), "embeddings", tenant)
            yield w
    finally:
        drop_roles(postgres, roles)


def test_the_suite_covers_every_shared_tenant_table(world: World) -> None:
    # A new table with tenant rows must be added to SHARED_TABLES (and so to every check below).
    assert tenant_tables(world.admin, "tenantry") == SHARED_TABLES


def test_roles_used_by_tenants_are_unprivileged_and_own_nothing(world: World) -> None:
    for role in (world.app_user, APP_ROLE, bridge_role(world.c), bridge_role(world.d)):
        row = world.admin.execute("""
            SELECT r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb,
                   (SELECT count(*) FROM pg_class WHERE relowner = r.oid),
                   (SELECT count(*) FROM pg_namespace WHERE nspowner = r.oid)
            FROM pg_roles r WHERE r.rolname = %s""", (role,)).fetchone()
        assert row == (False, False, False, False, 0, 0), role
    assert scalar(world.admin, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
                  (APP_ROLE,)) is False
    assert scalar(world.admin, "SELECT rolinherit FROM pg_roles WHERE rolname = %s",
                  (bridge_role(world.c),)) is False


# --- pool tenants: the app role with app.current_tenant ---------------------------------------


@pytest.mark.parametrize("table", SHARED_TABLES)
def test_a_tenant_reads_only_its_own_rows(world: World, table: str) -> None:
    qualified = f"tenantry.{table}"
    own = world.count(qualified, world.a)
    assert own >= 1
    assert world.count(qualified, world.b) >= 1
    with world.app() as app, tenant_transaction(app, world.a):
        seen = app.execute(q("SELECT DISTINCT tenant_id FROM {t}", t=qualified)).fetchall()
        assert seen == [(world.a,)]
        assert scalar(app, q("SELECT count(*) FROM {t}", t=qualified)) == own
        assert scalar(app, q("SELECT count(*) FROM {t} WHERE tenant_id = %s", t=qualified),
                      (world.b,)) == 0


@pytest.mark.parametrize("table", SHARED_TABLES)
def test_a_tenant_cannot_insert_rows_for_another(world: World, table: str) -> None:
    before = world.count(f"tenantry.{table}", world.b)
    with world.app() as app, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"), \
            tenant_transaction(app, world.a):
        insert(app, "tenantry", table, world.b)
    assert world.count(f"tenantry.{table}", world.b) == before


@pytest.mark.parametrize("table", SHARED_TABLES)
def test_a_tenant_cannot_update_or_delete_another_tenants_rows(world: World, table: str) -> None:
    qualified = f"tenantry.{table}"
    before = world.count(qualified, world.b)
    with world.app() as app:
        with tenant_transaction(app, world.a):
            updated = app.execute(q("UPDATE {t} SET tenant_id = tenant_id WHERE tenant_id = %s",
                                    t=qualified), (world.b,)).rowcount
            deleted = app.execute(q("DELETE FROM {t} WHERE tenant_id = %s", t=qualified),
                                  (world.b,)).rowcount
            everything = app.execute(q("DELETE FROM {t} WHERE tenant_id <> %s", t=qualified),
                                     (world.a,)).rowcount
        assert (updated, deleted, everything) == (0, 0, 0)
        # Nor can it hand its own rows over to b.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"), \
                tenant_transaction(app, world.a):
            app.execute(q("UPDATE {t} SET tenant_id = %s", t=qualified), (world.b,))
    assert world.count(qualified, world.b) == before


@pytest.mark.parametrize("table", SHARED_TABLES)
def test_without_a_tenant_nothing_is_visible_or_writable(world: World, table: str) -> None:
    qualified = f"tenantry.{table}"
    with world.app() as app:
        assert scalar(app, q("SELECT count(*) FROM {t}", t=qualified)) == 0
        # After a tenant transaction ends, its setting is gone (set_config is_local).
        with tenant_transaction(app, world.a):
            assert scalar(app, q("SELECT count(*) FROM {t}", t=qualified)) > 0
        assert scalar(app, q("SELECT count(*) FROM {t}", t=qualified)) == 0
        with pytest.raises((psycopg.errors.InsufficientPrivilege,
                            psycopg.errors.NotNullViolation)):
            insert(app, "tenantry", table, world.a)


@pytest.mark.parametrize("table", ["ai_usage_logs_default", "ai_conversations_default",
                                   "schema_migrations", "ai_usage_logs_{month}"])
def test_partitions_and_bookkeeping_are_out_of_reach(world: World, table: str) -> None:
    table = table.format(month=datetime.now(UTC).strftime("%Y_%m"))
    assert relation_exists(world.admin, f"tenantry.{table}")
    with world.app() as app, pytest.raises(psycopg.errors.InsufficientPrivilege), \
            tenant_transaction(app, world.a):
        app.execute(q("SELECT * FROM {t}", t=f"tenantry.{table}"))


def test_a_vector_search_never_returns_another_tenants_vectors(world: World) -> None:
    table = "tenantry.tenant_embeddings_d3"
    with world.app() as app:
        # b's vectors are exactly the query: they would be the nearest if visible.
        hits = search_collection(app, world.a, table, [0, 1, 0], k=10)
        assert {h[0] for h in hits} == set(world.ids[world.a])
        distances = [h[1] for h in hits]
        assert distances == sorted(distances)
        assert min(distances) > 0.5
        own = search_collection(app, world.b, table, [0, 1, 0], k=1)
        assert own[0][0] == world.ids[world.b][0]
        assert own[0][1] == pytest.approx(0.0)


def test_the_partial_index_serves_the_tenants_search(world: World) -> None:
    with world.app() as app, tenant_transaction(app, world.a):
        app.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in app.execute(
            sql.SQL("EXPLAIN ") + search_sql(world.a, "tenantry.tenant_embeddings_d3"),
            {"q": "[0,1,0]", "k": 5}).fetchall())
    assert pool_index_name(DIMS, world.a) in plan, plan


def test_one_shared_index_with_iterative_scan_isolates_too(world: World) -> None:
    dims = 4
    table = f"tenantry.{shared_embeddings_table(dims)}"
    for tenant in (world.a, world.b):
        assert ensure_collection(world.admin, tenant, "shared", dims, 8, 32,
                                 pool_index="shared") == table
    assert relation_exists(world.admin, f"tenantry.{pool_index_name(dims, None)}")
    assert not relation_exists(world.admin, f"tenantry.{pool_index_name(dims, world.a)}")
    with world.app() as app:
        for tenant, vector in ((world.a, "[1,0,0,0]"), (world.b, "[0,1,0,0]")):
            with tenant_transaction(app, tenant):
                for _ in range(20):
                    app.execute(q("INSERT INTO {t} (embedding) VALUES (%s::vector)", t=table),
                                (vector,))
        hits = search_collection(app, world.a, table, [0, 1, 0, 0], k=5, ef_search=10)
        assert len(hits) == 5
        with tenant_transaction(app, world.a):
            own = {r[0] for r in app.execute(q("SELECT id FROM {t}", t=table)).fetchall()}
        assert {h[0] for h in hits} <= own


def test_changed_hnsw_parameters_rebuild_the_index_and_same_ones_do_not(world: World) -> None:
    index = f"tenantry.{pool_index_name(DIMS, world.a)}"

    def state() -> tuple[int, list[str]]:
        row = world.admin.execute("SELECT oid::int, reloptions FROM pg_class"
                                  " WHERE oid = %s::regclass", (index,)).fetchone()
        assert row is not None
        return row[0], row[1]

    oid, options = state()
    assert options == ["m=8", "ef_construction=32"]
    ensure_collection(world.admin, world.a, "shared", DIMS, 8, 32)
    assert state() == (oid, options)
    try:
        ensure_collection(world.admin, world.a, "shared", DIMS, 12, 48)
        new_oid, new_options = state()
        assert new_oid != oid
        assert new_options == ["m=12", "ef_construction=48"]
    finally:
        ensure_collection(world.admin, world.a, "shared", DIMS, 8, 32)
    # A hand-dropped index comes back.
    world.admin.execute(q("DROP INDEX {i}", i=index))
    ensure_collection(world.admin, world.a, "shared", DIMS, 8, 32)
    assert state()[1] == ["m=8", "ef_construction=32"]


def test_bad_collection_parameters_are_refused(world: World) -> None:
    with pytest.raises(ValueError, match="ef_construction"):
        ensure_collection(world.admin, world.a, "shared", DIMS, 16, 20)
    with pytest.raises(ValueError, match="dimensions"):
        ensure_collection(world.admin, world.a, "shared", 0, 16, 64)
    with pytest.raises(ValueError, match="not vector"):
        ensure_collection(world.admin, world.c, "schema", DIMS + 1, 8, 32)


# --- bridge tenants: their own role and schema ------------------------------------------------


def test_a_bridge_role_works_in_its_own_schema(world: World) -> None:
    schema = bridge_schema(world.c)
    with world.bridge(world.c) as conn:
        with tenant_transaction(conn, world.c):
            assert scalar(conn, q("SELECT count(*) FROM {t}", t=f"{schema}.documents")) >= 1
            tenants = conn.execute(q("SELECT tenant_id, isolation FROM {t}",
                                     t=f"{schema}.tenants")).fetchall()
            assert tenants == [(world.c, "bridge")]
        hits = search_collection(conn, world.c, f"{schema}.embeddings", [1, 0, 0], k=3)
        assert len(hits) >= 1
        # Its schema is RLS-protected too: without its tenant set it sees nothing.
        assert scalar(conn, q("SELECT count(*) FROM {t}", t=f"{schema}.documents")) == 0


@pytest.mark.parametrize("statement", [
    "SELECT * FROM {d}.documents",
    "INSERT INTO {d}.documents (tenant_id, content) VALUES ('{dt}', 'x')",
    "DELETE FROM {d}.embeddings",
    "SELECT * FROM tenantry.documents",
    "SELECT * FROM tenantry.tenants",
    "SELECT * FROM tenantry.tenant_embeddings_d3",
    "INSERT INTO tenantry.documents (tenant_id, content) VALUES ('{ct}', 'x')",
])
def test_a_bridge_role_cannot_reach_other_schemas(world: World, statement: str) -> None:
    query = statement.format(d=bridge_schema(world.d), dt=world.d, ct=world.c)
    with world.bridge(world.c) as conn:
        for tenant in (world.c, world.d):  # whatever tenant it claims to be
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"), \
                    tenant_transaction(conn, tenant):
                conn.execute(query)


@pytest.mark.parametrize("statement", [
    "ALTER TABLE {s}.documents DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE {s}.documents NO FORCE ROW LEVEL SECURITY",
    "DROP POLICY tenant_isolation ON {s}.documents",
    "CREATE POLICY open ON {s}.documents USING (true)",
    "DROP TABLE {s}.documents",
    "CREATE TABLE {s}.mine (x int)",
    "ALTER SCHEMA {s} OWNER TO CURRENT_USER",
])
def test_a_bridge_role_cannot_weaken_its_own_schema(world: World, statement: str) -> None:
    with world.bridge(world.c) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement.format(s=bridge_schema(world.c)))


def test_a_bridge_role_cannot_grant_its_tables_on(world: World) -> None:
    table = f"{bridge_schema(world.c)}.documents"
    acl = scalar(world.admin, "SELECT relacl::text FROM pg_class WHERE oid = %s::regclass",
                 (table,))
    with world.bridge(world.c) as conn:
        # Postgres only warns ("no privileges were granted") when the grantor lacks the option.
        conn.execute(q("GRANT SELECT ON {t} TO PUBLIC", t=table))
        conn.execute(q("GRANT ALL ON {t} TO {r}", t=table, r=APP_ROLE))
    assert scalar(world.admin, "SELECT relacl::text FROM pg_class WHERE oid = %s::regclass",
                  (table,)) == acl


# --- a bridge tenant's usage and invoices: the platform's record, not the tenant's -----------


@pytest.mark.parametrize("table", BILLING_TABLES)
@pytest.mark.parametrize("statement", [
    "INSERT", "UPDATE {t} SET tenant_id = tenant_id", "DELETE FROM {t}", "TRUNCATE {t}",
    "LOCK TABLE {t} IN SHARE ROW EXCLUSIVE MODE", "SELECT * FROM {t} FOR UPDATE",
])
def test_a_bridge_login_reads_its_usage_and_invoices_but_cannot_write_them(
        world: World, table: str, statement: str) -> None:
    """Its password is in a Secret of its namespace: were the rows writable, it could delete
    its usage, or insert a request's row before the runtime does (ON CONFLICT DO NOTHING keeps
    the first) or next month's invoice at zero."""
    schema = bridge_schema(world.c)
    with world.bridge(world.c) as conn:
        with tenant_transaction(conn, world.c):
            conn.execute(q("SELECT count(*) FROM {t}", t=f"{schema}.{table}"))
        query = (sql.SQL(INSERTS[table]).format(s=sql.Identifier(schema))
                 if statement == "INSERT" else q(statement, t=f"{schema}.{table}"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), \
                tenant_transaction(conn, world.c):
            conn.execute(query, {"t": world.c, "at": datetime.now(UTC)})


def test_the_runtime_role_meters_into_a_bridge_schema_and_reads_nothing_there(
        world: World) -> None:
    schema = bridge_schema(world.c)
    before = world.count(f"{schema}.ai_usage_logs", world.c)
    with world.app() as app:
        row = (world.c, "req-metered", datetime.now(UTC), "m", 5)
        for _ in range(2):  # the runtime's statement: a batch read twice lands once
            with tenant_transaction(app, world.c):
                app.execute(q("INSERT INTO {t} (tenant_id, request_id, created_at, model,"
                              " input_tokens) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                              t=f"{schema}.ai_usage_logs"), row)
        assert world.count(f"{schema}.ai_usage_logs", world.c) == before + 1
        # Another tenant's row in c's schema: refused by the schema's pin (and RLS).
        with pytest.raises(psycopg.errors.CheckViolation, match="tenant_id_pinned"), \
                tenant_transaction(app, world.d):
            insert(app, schema, "ai_usage_logs", world.d)
        for statement in ("SELECT * FROM {t}.ai_usage_logs", "SELECT * FROM {t}.documents",
                          "UPDATE {t}.ai_usage_logs SET model = 'x'",
                          "DELETE FROM {t}.ai_usage_logs", "SELECT * FROM {t}.billing_invoices"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), \
                    tenant_transaction(app, world.c):
                app.execute(q(statement, t=schema))


def test_a_bridge_login_cannot_stall_closing_invoices(world: World) -> None:
    """The closer's table lock conflicts with nothing a read-only login can hold."""
    schema = bridge_schema(world.c)
    terms = BillingTerms.from_plan({})
    with world.bridge(world.c) as conn, tenant_transaction(conn, world.c):
        conn.execute(q("LOCK TABLE {t} IN ACCESS SHARE MODE", t=f"{schema}.billing_invoices"))
        conn.execute(q("SELECT * FROM {t}", t=f"{schema}.billing_invoices")).fetchall()
        conn.execute("SELECT pg_advisory_lock(hashtext('tenantry-billing:' || %s))",
                     (world.c,))
        with connect(world.pg, world.db) as admin, tenant_transaction(admin, world.c):
            admin.execute("SET LOCAL lock_timeout = '5s'")
            invoice = close_invoice(admin, schema, world.c, date(2001, 1, 1), terms)
        assert invoice.status == "closed"


def test_a_wrong_password_is_refused(world: World) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        world.bridge(world.c, password="not-" + world.passwords[world.c]).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        world.bridge(world.c, password=world.passwords[world.d]).close()


def test_roles_without_a_grant_cannot_connect_to_the_database(world: World) -> None:
    stranger, password = unique("stranger"), secrets.token_urlsafe(12)
    world.roles.append(stranger)
    create_login_role(world.admin, stranger, password)
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        connect(world.pg, world.db, stranger, password).close()


def test_a_new_password_replaces_the_old_one(world: World) -> None:
    tenant = world.add_bridge(unique("p"))
    old = world.passwords[tenant]
    new = secrets.token_urlsafe(12)
    ensure_bridge_tenant(world.admin, tenant, new)
    world.passwords[tenant] = new
    world.bridge(tenant).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        world.bridge(tenant, password=old).close()


# --- hostile tenant ids -----------------------------------------------------------------------


def _enter(admin: Conn, name: str) -> None:
    with tenant_transaction(admin, name):
        pass


ENTRY_POINTS: dict[str, Callable[[Conn, str], object]] = {
    "validate_tenant_id": lambda _, n: validate_tenant_id(n),
    "bridge_schema": lambda _, n: bridge_schema(n),
    "bridge_role": lambda _, n: bridge_role(n),
    "set_tenant": set_tenant,
    "tenant_transaction": _enter,
    "rollup_usage": lambda c, n: rollup_usage(c, "tenantry", date.today(), tenant=n),
    "ensure_pool_tenant": ensure_pool_tenant,
    "ensure_bridge_tenant": lambda c, n: ensure_bridge_tenant(c, n, "pw"),
    "ensure_collection_shared": lambda c, n: ensure_collection(c, n, "shared", DIMS, 8, 32),
    "ensure_collection_schema": lambda c, n: ensure_collection(c, n, "schema", DIMS, 8, 32),
    "search_collection": lambda c, n: search_collection(
        c, n, "tenantry.tenant_embeddings_d3", [1, 0, 0], 1),
    "search_sql": lambda _, n: search_sql(n, "tenantry.tenant_embeddings_d3"),
    "pool_index_name": lambda _, n: pool_index_name(DIMS, n),
    "retain_tenant": retain_tenant,
    "delete_tenant_data": delete_tenant_data,
    "delete_shared_rows": delete_shared_rows,
    "drop_bridge": drop_bridge,
}


def fingerprint(conn: Conn) -> list[tuple[Any, ...]]:
    """Relations, roles and row counts that a successful injection would change."""
    rels = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE n.nspname LIKE 'tenant%%'"
                        " ORDER BY 1, 2").fetchall()
    roles = conn.execute("SELECT rolname, rolcanlogin FROM pg_roles ORDER BY 1").fetchall()
    counts = [(t, scalar(conn, q("SELECT count(*) FROM {t}", t=f"tenantry.{t}")))
              for t in SHARED_TABLES]
    states = conn.execute("SELECT tenant_id, state FROM tenantry.tenants ORDER BY 1").fetchall()
    return [*rels, *roles, *counts, *states]


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("function", ENTRY_POINTS)
def test_hostile_tenant_ids_are_refused_everywhere(world: World, function: str,
                                                   name: str) -> None:
    before = fingerprint(world.admin)
    with pytest.raises(InvalidTenantId, match="invalid tenant id"):
        ENTRY_POINTS[function](world.admin, name)
    assert world.admin.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert fingerprint(world.admin) == before


def test_valid_ids_pass_validation() -> None:
    for name in ("a", "acme", "a1", "z" * 40):
        assert validate_tenant_id(name) == name


# --- deletion policies ------------------------------------------------------------------------


def test_retain_locks_the_tenant_out_and_keeps_its_data(world: World) -> None:
    tenant = world.add_bridge(unique("r"))
    schema = bridge_schema(tenant)
    session = world.bridge(tenant)
    with tenant_transaction(session, tenant):
        insert(session, schema, "documents", tenant)
    try:
        described = retain_tenant(world.admin, tenant)
        assert f"schema {schema}: documents=1" in described
        assert "tenants=1" in described
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            world.bridge(tenant).close()
        with pytest.raises(psycopg.OperationalError):  # its open session was terminated
            session.execute("SELECT 1")
    finally:
        session.close()
    assert world.count(f"{schema}.documents", tenant) == 1
    for where in ("tenantry", schema):
        assert scalar(world.admin, q("SELECT state FROM {t} WHERE tenant_id = %s",
                                       t=f"{where}.tenants"),
                      (tenant,)) == "retained"
    assert retain_tenant(world.admin, tenant) == described  # idempotent
    # Re-provisioning brings it back, with its data.
    ensure_bridge_tenant(world.admin, tenant, world.passwords[tenant])
    ensure_pool_tenant(world.admin, tenant, "bridge")
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        assert scalar(conn, q("SELECT count(*) FROM {t}", t=f"{schema}.documents")) == 1
    assert scalar(world.admin, "SELECT state FROM tenantry.tenants WHERE tenant_id = %s",
                  (tenant,)) == "active"


def test_retain_of_a_pool_tenant_describes_its_shared_rows(world: World) -> None:
    tenant = unique("q")
    ensure_pool_tenant(world.admin, tenant)
    with tenant_transaction(world.admin, tenant):
        insert(world.admin, "tenantry", "documents", tenant)
        insert(world.admin, "tenantry", "documents", tenant)
    described = retain_tenant(world.admin, tenant)
    assert "shared schema tenantry: documents=2, tenants=1" in described
    assert "role" not in described
    assert world.count("tenantry.documents", tenant) == 2


def shared_counts(world: World, tenant: str) -> dict[str, int]:
    return {t: world.count(f"tenantry.{t}", tenant) for t in SHARED_TABLES}


def test_delete_removes_schema_role_rows_and_indexes(world: World) -> None:
    bridge = world.add_bridge(unique("f"))
    pool = unique("g")
    ensure_pool_tenant(world.admin, pool)
    ensure_collection(world.admin, pool, "shared", DIMS, 8, 32)
    with tenant_transaction(world.admin, pool):
        for table in SHARED_TABLES:
            if table != "tenants":
                insert(world.admin, "tenantry", table, pool)
        for table in ("ai_conversations", "ai_usage_logs"):  # DEFAULT partition
            insert(world.admin, "tenantry", table, pool, at=datetime(1999, 1, 1, tzinfo=UTC))
    assert all(shared_counts(world, pool).values())
    others = {t: shared_counts(world, t) for t in (world.a, world.b)}
    session = world.bridge(bridge)  # an open session does not block the deletion

    for _ in range(2):  # idempotent
        delete_tenant_data(world.admin, bridge)
        delete_tenant_data(world.admin, pool)

    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert not scalar(world.admin, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                      (bridge_schema(bridge),))
    assert not scalar(world.admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s",
                      (bridge_role(bridge),))
    assert set(shared_counts(world, pool).values()) == {0}
    assert set(shared_counts(world, bridge).values()) == {0}
    assert not relation_exists(world.admin, f"tenantry.{pool_index_name(DIMS, pool)}")
    assert relation_exists(world.admin, f"tenantry.{pool_index_name(DIMS, world.a)}")
    assert {t: shared_counts(world, t) for t in (world.a, world.b)} == others
    # Deleting a tenant that never existed is fine too.
    delete_tenant_data(world.admin, unique("never"))


def test_moving_data_out_keeps_the_registry_row(world: World) -> None:
    tenant = unique("m")
    ensure_pool_tenant(world.admin, tenant)
    with tenant_transaction(world.admin, tenant):
        for table in ("documents", "ai_usage_logs", "tenant_embeddings_d3"):
            insert(world.admin, "tenantry", table, tenant)
    assert delete_shared_rows(world.admin, tenant, keep_registry=True) == 3
    counts = shared_counts(world, tenant)
    assert counts.pop("tenants") == 1
    assert set(counts.values()) == {0}
    assert delete_shared_rows(world.admin, tenant) == 1
    assert delete_shared_rows(world.admin, tenant) == 0


def test_the_registry_never_records_a_lower_isolation(world: World) -> None:
    # A reconcile from a stale spec must not point writers back at data already moved away.
    tenant = unique("reg")
    ensure_pool_tenant(world.admin, tenant)
    ensure_pool_tenant(world.admin, tenant, "silo")
    for lower in ("bridge", "pool"):
        with pytest.raises(IsolationLowered, match="lives at silo"):
            ensure_pool_tenant(world.admin, tenant, lower)
    with tenant_transaction(world.admin, tenant):
        assert scalar(world.admin, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                      (tenant,)) == "silo"
    delete_shared_rows(world.admin, tenant)


def test_provisioning_converges_after_manual_damage(world: World) -> None:
    tenant = world.add_bridge(unique("h"))
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    ensure_collection(world.admin, tenant, "schema", DIMS, 8, 32)
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        insert(conn, schema, "documents", tenant)
    admin = world.admin
    # Someone drops the role by hand, hands the schema to another role, drops the index.
    admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    admin.execute(q("ALTER SCHEMA {s} OWNER TO {r}", s=schema, r=APP_ROLE))
    admin.execute(q("ALTER TABLE {t} OWNER TO {r}", t=f"{schema}.documents", r=APP_ROLE))
    admin.execute(q("DROP INDEX {i}", i=f"{schema}.embeddings_hnsw"))

    for _ in range(2):
        ensure_bridge_tenant(admin, tenant, world.passwords[tenant])
        ensure_collection(admin, tenant, "schema", DIMS, 8, 32)

    owners = admin.execute("""
        SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s
        UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s""",
        (schema, schema)).fetchall()
    assert owners == [("postgres",)]
    assert relation_exists(admin, f"{schema}.embeddings_hnsw")
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        assert scalar(conn, q("SELECT count(*) FROM {t}", t=f"{schema}.documents")) == 1
        insert(conn, schema, "embeddings", tenant)
    # And after the schema itself is dropped by hand.
    admin.execute(q("DROP SCHEMA {s} CASCADE", s=schema))
    ensure_bridge_tenant(admin, tenant, world.passwords[tenant])
    ensure_collection(admin, tenant, "schema", DIMS, 8, 32)
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        insert(conn, schema, "embeddings", tenant)
        assert scalar(conn, q("SELECT count(*) FROM {t}", t=f"{schema}.embeddings")) == 1


def test_bootstrap_is_idempotent(world: World) -> None:
    assert bootstrap_shared(world.admin) == []
    with world.app() as app, tenant_transaction(app, world.a):
        assert scalar(app, "SELECT count(*) FROM tenantry.tenant_embeddings_d3") == 2


# --- concurrent and settled reconciles --------------------------------------------------------


def catalog_state(admin: Conn, schemas: list[str], roles: list[str]) -> list[tuple[Any, ...]]:
    """The row versions (xmin) of every catalog row a reconcile could rewrite."""
    queries = [
        "SELECT 'role', rolname, xmin::text FROM pg_authid WHERE rolname = ANY(%(roles)s)",
        "SELECT 'member', roleid::regrole::text || '>' || member::regrole::text, xmin::text"
        " FROM pg_auth_members",
        "SELECT 'database', datname, xmin::text FROM pg_database",
        "SELECT 'schema', nspname, xmin::text FROM pg_namespace"
        " WHERE nspname = ANY(%(schemas)s) OR nspname = 'public'",
        "SELECT 'relation', n.nspname || '.' || c.relname, c.xmin::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY(%(schemas)s)",
        "SELECT 'constraint', c.conrelid::regclass::text || '.' || c.conname, c.xmin::text"
        " FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE n.nspname = ANY(%(schemas)s)",
        "SELECT 'policy', polrelid::regclass::text, xmin::text FROM pg_policy",
    ]
    rows: list[tuple[Any, ...]] = []
    for query in queries:
        rows += admin.execute(query, {"schemas": schemas, "roles": roles}).fetchall()
    for schema in schemas:  # the registry rows: not even a row lock (xmax)
        rows += admin.execute(q("SELECT tenant_id, xmin::text, xmax::text FROM {t}",
                                t=f"{schema}.tenants")).fetchall()
    return sorted(rows)


def test_a_settled_reconcile_writes_nothing(world: World) -> None:
    tenant = world.add_bridge(unique("s"))
    pool = unique("sp")
    schemas = ["tenantry", bridge_schema(tenant)]
    roles = [bridge_role(tenant), APP_ROLE]

    def reconcile() -> None:
        bootstrap_shared(world.admin)
        ensure_bridge_tenant(world.admin, tenant, world.passwords[tenant])
        ensure_pool_tenant(world.admin, tenant, "bridge")
        ensure_collection(world.admin, tenant, "schema", DIMS, 8, 32)
        ensure_pool_tenant(world.admin, pool)
        ensure_collection(world.admin, pool, "shared", DIMS, 8, 32, "shared")

    reconcile()
    before = catalog_state(world.admin, schemas, roles)
    reconcile()
    assert catalog_state(world.admin, schemas, roles) == before
    world.bridge(tenant).close()  # and the password still works


def test_concurrent_reconciles_of_bridge_tenants_never_fail(world: World) -> None:
    tenants = [world.add_bridge(unique("k")) for _ in range(3)]
    threads_per_tenant, rounds = 3, 8
    barrier = threading.Barrier(threads_per_tenant * len(tenants))

    def reconcile(tenant: str) -> int:
        with connect(world.pg, world.db) as admin:
            barrier.wait(timeout=60)
            for _ in range(rounds):
                ensure_bridge_tenant(admin, tenant, world.passwords[tenant])
                ensure_pool_tenant(admin, tenant, "bridge")
                ensure_collection(admin, tenant, "schema", DIMS, 8, 32)
        return rounds

    with ThreadPoolExecutor(max_workers=threads_per_tenant * len(tenants)) as pool:
        futures = [pool.submit(reconcile, t) for t in tenants for _ in range(threads_per_tenant)]
        assert [f.result(timeout=300) for f in futures] == [rounds] * len(futures)
    for tenant in tenants:
        with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
            insert(conn, bridge_schema(tenant), "embeddings", tenant)


# --- the shared pool index --------------------------------------------------------------------


def test_the_shared_index_does_not_follow_a_tenants_parameters(world: World) -> None:
    dims = 5
    index = f"tenantry.{pool_index_name(dims, None)}"
    first, second = unique("ia"), unique("ib")
    for tenant in (first, second):
        ensure_pool_tenant(world.admin, tenant)

    def state() -> tuple[int, list[str]]:
        row = world.admin.execute("SELECT oid::int, reloptions FROM pg_class"
                                  " WHERE oid = %s::regclass", (index,)).fetchone()
        assert row is not None
        return row[0], row[1]

    ensure_collection(world.admin, first, "shared", dims, 8, 32, "shared")
    created = state()
    assert created[1] == ["m=8", "ef_construction=32"]
    for _ in range(2):  # resyncs alternate between tenants whose specs differ
        ensure_collection(world.admin, second, "shared", dims, 16, 64, "shared")
        assert state() == created
        ensure_collection(world.admin, first, "shared", dims, 8, 32, "shared")
        assert state() == created
    # A tenant's own index still follows its spec.
    ensure_collection(world.admin, second, "shared", dims, 16, 64, "partial")
    partial_index = f"tenantry.{pool_index_name(dims, second)}"
    assert scalar(world.admin, "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                  (partial_index,)) == ["m=16", "ef_construction=64"]
    assert state() == created


# --- deletion when the role cannot be dropped -------------------------------------------------


def test_a_role_that_cannot_be_dropped_keeps_no_data_and_is_retried(world: World) -> None:
    tenant = world.add_bridge(unique("x"))
    schema = bridge_schema(tenant)
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        insert(conn, schema, "documents", tenant)
    ensure_pool_tenant(world.admin, tenant, "bridge")
    # The tenant's login owns something in a database the admin cannot enter right now.
    with scratch_database(world.pg, "lo") as elsewhere:
        world.admin.execute(q("GRANT CONNECT ON DATABASE {d} TO {r}", d=elsewhere,
                              r=bridge_role(tenant)))
        with connect(world.pg, elsewhere, bridge_role(tenant),
                     world.passwords[tenant]) as conn:
            conn.execute("SELECT lo_create(0)")
        world.admin.execute(q("ALTER DATABASE {d} WITH ALLOW_CONNECTIONS false", d=elsewhere))
        with pytest.raises(RuntimeError, match="could not be dropped") as failure:
            delete_tenant_data(world.admin, tenant)
        assert elsewhere in str(failure.value)
        # The data went first, in its own transaction; the role is locked out.
        assert not scalar(world.admin, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                          (schema,))
        assert set(shared_counts(world, tenant).values()) == {0}
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            world.bridge(tenant).close()
        world.admin.execute(q("ALTER DATABASE {d} WITH ALLOW_CONNECTIONS true", d=elsewhere))
        delete_tenant_data(world.admin, tenant)  # the retry
        assert not scalar(world.admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s",
                          (bridge_role(tenant),))


# --- names from before they were opaque -------------------------------------------------------


def test_legacy_names_are_renamed_with_their_data(world: World) -> None:
    tenant = world.add_bridge(unique("old"))
    role, schema, legacy = bridge_role(tenant), bridge_schema(tenant), f"tenant_{tenant}"
    ensure_collection(world.admin, tenant, "schema", DIMS, 8, 32)
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        insert(conn, schema, "documents", tenant)
    # As an operator before opaque names left it (its role adopted into the registry).
    world.admin.execute(q("ALTER SCHEMA {s} RENAME TO {l}", s=schema, l=legacy))
    world.admin.execute(q("ALTER ROLE {r} RENAME TO {l}", r=role, l=legacy))
    world.admin.execute("UPDATE tenantry.managed_roles SET role_name = %s WHERE role_name = %s",
                        (legacy, role))
    world.roles.append(legacy)
    legacy_index = f"emb_d{DIMS}_{tenant}_hnsw"
    world.admin.execute(q(f"CREATE INDEX {{i}} ON tenantry.tenant_embeddings_d{DIMS}"
                          " USING hnsw (embedding vector_cosine_ops)", i=legacy_index))

    ensure_bridge_tenant(world.admin, tenant, world.passwords[tenant])
    ensure_collection(world.admin, tenant, "shared", DIMS, 8, 32, "partial")
    assert not scalar(world.admin, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                      (legacy,))
    assert not scalar(world.admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (legacy,))
    assert not relation_exists(world.admin, f"tenantry.{legacy_index}")
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):  # same password
        assert scalar(conn, q("SELECT count(*) FROM {t}", t=f"{schema}.documents")) == 1
    delete_tenant_data(world.admin, tenant)
    assert not scalar(world.admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,))
