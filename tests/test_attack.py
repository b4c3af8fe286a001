"""A hostile tenant's attacks, as the runtime's login and as a bridge login (issue 6, 11-17).

Each attack here succeeded against the code before the hardening; each must fail now. The
runtime's login is a member of APP_ROLE (as the runtime will use it); a bridge login is the
tenant's own role. New names of the contract are looked up at call time (`contract.x`), so
that a missing one fails its test alone.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import psycopg
import pytest
import test_database_isolation as isolation
from db_helpers import Conn, connect, create_login_role, q, scalar, scratch_database, unique
from psycopg_pool import ConnectionPool
from tenantry_operator.database import (
    bootstrap_shared,
    delete_tenant_data,
    ensure_bridge_tenant,
    ensure_collection,
    ensure_pool_tenant,
    pool_index_name,
)
from tenantry_runtime.contracts import database as contract
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    bridge_role,
    bridge_schema,
    tenant_transaction,
)
from test_database_isolation import SHARED_TABLES, World, insert, shared_counts

world = isolation.world  # the same fixture: pool tenants a, b; bridge tenants c, d

Login = Literal["runtime", "bridge"]
LOGINS: list[Login] = ["runtime", "bridge"]


def login(world: World, who: Login, database: str | None = None) -> Conn:
    if who == "runtime":
        return connect(world.pg, database or world.db, world.app_user, world.app_password)
    return connect(world.pg, database or world.db, bridge_role(world.c),
                   world.passwords[world.c])


@contextmanager
def stranger(world: World) -> Iterator[tuple[str, str]]:
    """A login of someone else on the cluster (another application's user)."""
    name, password = unique("other"), secrets.token_urlsafe(12)
    world.roles.append(name)
    create_login_role(world.admin, name, password)
    world.admin.execute(q("GRANT CONNECT ON DATABASE {d} TO {r}", d=world.db, r=name))
    yield name, password


# --- 13: other databases and large objects ----------------------------------------------------


@pytest.mark.parametrize("database", ["postgres", "template1"])
@pytest.mark.parametrize("who", LOGINS)
def test_no_login_reaches_the_other_databases(world: World, who: Login, database: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        login(world, who, database).close()


def test_a_large_object_elsewhere_does_not_keep_a_deleted_tenant(world: World) -> None:
    tenant = world.add_bridge(unique("lo"))
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    with world.bridge(tenant) as conn, tenant_transaction(conn, tenant):
        insert(conn, schema, "documents", tenant)
    # A database created after bootstrap: PUBLIC has CONNECT there again until the next one.
    with scratch_database(world.pg, "late") as late:
        for database in (late, world.db):
            with connect(world.pg, database, role, world.passwords[tenant]) as conn:
                conn.execute("SELECT lo_create(0)")
        delete_tenant_data(world.admin, tenant)
        with connect(world.pg, late) as admin:
            assert scalar(admin, "SELECT count(*) FROM pg_largeobject_metadata") == 0
    assert scalar(world.admin, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                  (schema,)) == 0
    assert scalar(world.admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == 0
    assert set(shared_counts(world, tenant).values()) == {0}


# --- 14: temporary tables ---------------------------------------------------------------------


@pytest.mark.parametrize("who", LOGINS)
def test_no_login_creates_temporary_tables(world: World, who: Login) -> None:
    # A temp table has no RLS and shadows unqualified names on a pooled connection.
    with login(world, who) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege,
                                                  match="temporary tables"):
        conn.execute("CREATE TEMP TABLE documents (tenant_id text, content text)")


# --- 11: the empty tenant ---------------------------------------------------------------------

# Ways a session ends up with app.current_tenant = '' rather than a tenant.
EMPTYING: dict[str, str | None] = {
    "after a tenant transaction": None,
    "RESET": "RESET app.current_tenant",
    "set_config NULL": "SELECT set_config('app.current_tenant', NULL, false)",
    "DISCARD ALL": "DISCARD ALL",
    "SET ''": "SET app.current_tenant = ''",
}
# The policy refuses the row (no tenant) or a constraint does.
REFUSED = (psycopg.errors.InsufficientPrivilege, psycopg.errors.CheckViolation,
           psycopg.errors.NotNullViolation)
# Tables whose tenant_id had no CHECK before (tenants always refused '').
UNCHECKED = [t for t in SHARED_TABLES if t != "tenants"]


def emptied(conn: Conn, world: World, way: str) -> Conn:
    """Leave `conn` without a tenant the way `way` does, after it had one."""
    with tenant_transaction(conn, world.a):
        pass
    statement = EMPTYING[way]
    if statement is not None:
        conn.execute("SELECT set_config('app.current_tenant', %s, false)", (world.a,))
        conn.execute(statement.encode())
    assert scalar(conn, "SELECT current_setting('app.current_tenant', true)") in ("", None)
    return conn


@pytest.mark.parametrize("table", UNCHECKED)
@pytest.mark.parametrize("way", EMPTYING)
def test_no_shared_empty_bucket(world: World, way: str, table: str) -> None:
    with world.app() as writer:
        emptied(writer, world, way)
        with pytest.raises(REFUSED):
            insert(writer, "tenantry", table, "")
    with world.app() as reader:  # another path that forgot its tenant
        emptied(reader, world, way)
        assert scalar(reader, q("SELECT count(*) FROM {t}", t=f"tenantry.{table}")) == 0
    assert world.count(f"tenantry.{table}", "") == 0


@pytest.mark.parametrize("table", ["documents", "ai_conversations", "tenant_embeddings_d3"])
def test_a_forgotten_tenant_takes_no_default(world: World, table: str) -> None:
    columns = {"documents": "(content) VALUES ('x')",
               "ai_conversations": "(title) VALUES ('x')",
               "tenant_embeddings_d3": "(embedding) VALUES ('[1,0,0]')"}[table]
    with world.app() as app:
        emptied(app, world, "after a tenant transaction")
        with pytest.raises(REFUSED):
            app.execute(q("INSERT INTO {t} ", t=f"tenantry.{table}") + psycopg.sql.SQL(columns))


@pytest.mark.parametrize("table", UNCHECKED)
def test_not_even_the_admin_writes_an_invalid_tenant_id(world: World, table: str) -> None:
    for bad in ("", "A", "tenant-"):
        with pytest.raises(psycopg.errors.CheckViolation, match="tenant_id_valid"):
            insert(world.admin, "tenantry", table, bad)


def test_a_pooled_connection_returns_without_a_tenant(world: World) -> None:
    dsn = world.pg.dsn(world.db, world.app_user, world.app_password)
    with ConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True},
                        reset=contract.reset_session, open=True) as pool:
        with pool.connection() as conn:
            # A code path that sets the tenant for the session instead of the transaction.
            conn.execute("SELECT set_config('app.current_tenant', %s, false)", (world.a,))
            assert scalar(conn, "SELECT count(*) FROM tenantry.documents") >= 1
            backend = scalar(conn, "SELECT pg_backend_pid()")
        with pool.connection() as conn:
            assert scalar(conn, "SELECT pg_backend_pid()") == backend  # the same session
            assert scalar(conn, "SELECT count(*) FROM tenantry.documents") == 0


# --- 15: roles the operator did not create, and memberships -----------------------------------


def test_a_pre_existing_role_is_not_taken_over(world: World) -> None:
    tenant = unique("pre")
    role, own_password = bridge_role(tenant), secrets.token_urlsafe(12)
    world.roles.append(role)
    # Someone with CREATEROLE prepared the tenant's role name, with rights of its own.
    create_login_role(world.admin, role, own_password, "pg_read_all_data")
    with pytest.raises(RuntimeError, match="did not create it"):
        ensure_bridge_tenant(world.admin, tenant, "operator-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(world.pg, world.db, role, "operator-password").close()
    # Nor is it granted anything: its owner cannot reach tenant data through the operator.
    with connect(world.pg, "postgres") as admin:
        assert scalar(admin, "SELECT has_database_privilege(%s, %s, 'CONNECT')",
                      (role, world.db)) is False


def test_memberships_of_a_bridge_role_are_stripped(world: World) -> None:
    tenant = world.add_bridge(unique("mb"))
    role = bridge_role(tenant)
    with stranger(world) as (other, other_password):
        world.admin.execute(q("GRANT pg_read_all_data TO {r}", r=role))
        world.admin.execute(q("GRANT {r} TO {o}", r=role, o=other))
        ensure_bridge_tenant(world.admin, tenant, world.passwords[tenant])
        with world.bridge(tenant) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("SET ROLE pg_read_all_data")
        with connect(world.pg, world.db, other, other_password) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(q("SET ROLE {r}", r=role))


def test_memberships_of_the_app_role_are_stripped(world: World) -> None:
    try:
        world.admin.execute(q("GRANT pg_read_all_data TO {r}", r=APP_ROLE))
        bootstrap_shared(world.admin)
        with world.app() as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("SET ROLE pg_read_all_data")
    finally:
        world.admin.execute(q("REVOKE pg_read_all_data FROM {r}", r=APP_ROLE))


# --- 17: a bridge schema is the tenant's alone -------------------------------------------------


@pytest.mark.parametrize(("table", "refusal", "match"), [
    ("documents", psycopg.errors.CheckViolation, "tenant_id_pinned"),
    ("embeddings", psycopg.errors.CheckViolation, "tenant_id_pinned"),
    # Usage rows are the platform's (BILLING_TABLES): refused before the pin is reached.
    ("ai_usage_logs", psycopg.errors.InsufficientPrivilege, "permission denied"),
])
def test_a_bridge_login_cannot_write_rows_of_another_tenant(
        world: World, table: str, refusal: type[Exception], match: str) -> None:
    schema = bridge_schema(world.c)
    # It controls the setting too: claiming d's id satisfies the policy, not the pin.
    with world.bridge(world.c) as conn, pytest.raises(refusal, match=match), \
            tenant_transaction(conn, world.d):
        insert(conn, schema, table, world.d)
    assert world.count(f"{schema}.{table}", world.d) == 0


@pytest.mark.parametrize("statement", [
    "UPDATE {t} SET isolation = 'pool'",
    "DELETE FROM {t}",
    "INSERT INTO {t} (tenant_id, isolation) VALUES ('{c}', 'silo')",
])
def test_a_bridge_login_cannot_write_its_registry_copy(world: World, statement: str) -> None:
    table = q("{t}", t=f"{bridge_schema(world.c)}.tenants").as_string()
    with world.bridge(world.c) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"), \
                tenant_transaction(conn, world.c):
            conn.execute(statement.format(t=table, c=world.c).encode())
        with tenant_transaction(conn, world.c):  # reading it stays possible
            assert conn.execute(q("SELECT isolation, state FROM {t}",
                                  t=f"{bridge_schema(world.c)}.tenants")).fetchall() == [
                ("bridge", "active")]


# --- 16: what every login can read in the catalogs --------------------------------------------

CATALOG_TEXT = """
    SELECT string_agg(x, ' ') FROM (
        SELECT nspname::text FROM pg_namespace
        UNION ALL SELECT rolname::text FROM pg_roles
        UNION ALL SELECT schemaname || '.' || indexname || ' ' || indexdef FROM pg_indexes
        UNION ALL SELECT schemaname || '.' || relname FROM pg_stat_user_tables
        UNION ALL SELECT relname::text FROM pg_class
        UNION ALL SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
        UNION ALL SELECT pg_get_expr(polqual, polrelid) FROM pg_policy
        UNION ALL SELECT usename::text FROM pg_stat_activity WHERE usename IS NOT NULL
    ) AS listed(x)"""


@pytest.mark.parametrize("who", LOGINS)
def test_catalogs_do_not_name_other_tenants(world: World, who: Login) -> None:
    pooled = unique("listed")
    ensure_pool_tenant(world.admin, pooled)
    ensure_collection(world.admin, pooled, "shared", 3, 8, 32, "shared")
    with tenant_transaction(world.admin, pooled):
        insert(world.admin, "tenantry", "documents", pooled)
    # d has a session open meanwhile (pg_stat_activity)
    with world.bridge(world.d), login(world, who) as conn:
        listed = scalar(conn, CATALOG_TEXT)
    for tenant in (world.d, pooled, *([world.c] if who == "runtime" else [])):
        assert tenant not in listed
    assert bridge_schema(world.d) in listed  # the names are there, only opaque


def test_a_partial_pool_index_has_an_opaque_name(world: World) -> None:
    tenant = unique("part")
    ensure_pool_tenant(world.admin, tenant)
    ensure_collection(world.admin, tenant, "shared", 3, 8, 32, "partial")
    name = pool_index_name(3, tenant)
    assert tenant not in name
    # LIMITATION: its predicate (pg_indexes.indexdef) names the tenant; "shared" (the
    # default strategy) has none.
    assert scalar(world.admin, "SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                  (name,)).endswith(f"WHERE (tenant_id = '{tenant}'::text)")
