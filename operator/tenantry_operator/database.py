"""Provision, search, retain and delete tenant data in Postgres (sync psycopg, idempotent)."""

# Names (roles, schemas, tables, indexes) are composed with psycopg.sql.Identifier; values are
# bound parameters. Two exceptions, both documented where they occur: the tenant id as a literal
# in a partial index predicate and in the matching search filter (validated against
# TENANT_ID_PATTERN first; the planner must see the value to use the partial index), and the
# role password in ALTER ROLE, which takes no parameter; it is sent as a SCRAM verifier computed
# by libpq, so the clear text never reaches the server or its logs.
#
# The admin connection must see across tenants: a superuser, or the owner with BYPASSRLS.

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar
from uuid import UUID

import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.adapt import PyFormat
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    SHARED_SCHEMA,
    Conn,
    bridge_role,
    bridge_schema,
    ensure_partitions,
    ensure_tenant_rls,
    fetch_rows,
    migrate,
    operator_lock,
    tenant_transaction,
    validate_identifier,
    validate_tenant_id,
)

__all__ = [
    "MAX_DIMENSIONS",
    "SCHEMA_EMBEDDINGS",
    "CollectionMismatch",
    "bootstrap_shared",
    "delete_shared_rows",
    "delete_tenant_data",
    "drop_bridge",
    "ensure_bridge_tenant",
    "ensure_collection",
    "ensure_pool_tenant",
    "grant_app_role",
    "pool_index_name",
    "retain_tenant",
    "search_collection",
    "search_sql",
    "shared_embeddings_table",
    "tenant_tables",
]

Isolation = Literal["pool", "bridge", "silo"]
Location = Literal["shared", "schema"]
PoolIndex = Literal["partial", "shared"]

# pgvector's HNSW index on `vector` supports at most 2000 dimensions.
MAX_DIMENSIONS = 2000
DML = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
SCHEMA_EMBEDDINGS = "embeddings"
_SHARED_EMBEDDINGS = re.compile(r"^tenant_embeddings_d(\d{1,4})$")
_ROLE_ATTRIBUTES = {  # pg_roles column -> keyword when true (NO<keyword> when false)
    "rolcanlogin": "LOGIN", "rolinherit": "INHERIT", "rolsuper": "SUPERUSER",
    "rolbypassrls": "BYPASSRLS", "rolcreatedb": "CREATEDB", "rolcreaterole": "CREATEROLE",
    "rolreplication": "REPLICATION",
}
_LOCKED_DOWN = {"rolsuper": False, "rolbypassrls": False, "rolcreatedb": False,
                "rolcreaterole": False, "rolreplication": False}


T = TypeVar("T")


async def in_database(dsn: str, work: Callable[[Conn], T]) -> T:
    """Run `work` on a fresh autocommit connection in a worker thread.

    One short connection per call: the operator is not a hot path, and a fresh connection
    never carries state from a failed step.
    """

    def run() -> T:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            return work(conn)

    return await asyncio.to_thread(run)


class CollectionMismatch(ValueError):
    """An existing collection cannot be converged to the requested one (e.g. other dimensions)."""


# --- names ------------------------------------------------------------------------------------


def shared_embeddings_table(dimensions: int) -> str:
    """The pool tenants' embeddings table for `dimensions` in the shared schema."""
    _check_dimensions(dimensions)
    return f"tenant_embeddings_d{dimensions}"


def pool_index_name(dimensions: int, tenant: str | None) -> str:
    """HNSW index on the shared table: per tenant (partial) when `tenant` is given, else whole.

    At most 4 + 4 + 1 + 40 + 5 = 54 characters, under Postgres' 63.
    """
    _check_dimensions(dimensions)
    if tenant is None:
        return f"tenant_embeddings_d{dimensions}_hnsw"
    return f"emb_d{dimensions}_{validate_tenant_id(tenant)}_hnsw"


def _check_dimensions(dimensions: int) -> None:
    if not 1 <= dimensions <= MAX_DIMENSIONS:
        raise ValueError(f"dimensions must be within 1..{MAX_DIMENSIONS}, got {dimensions}")


# --- catalog helpers --------------------------------------------------------------------------


def tenant_tables(conn: Conn, schema: str) -> list[str]:
    """Tables of `schema` that hold tenant rows: those with tenant_id, partitions excluded."""
    rows = fetch_rows(conn, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                      AND a.attname = 'tenant_id' AND NOT a.attisdropped)
        ORDER BY c.relname""", (validate_identifier(schema),))
    return [str(name) for (name,) in rows]


def _private_tables(conn: Conn, schema: str) -> list[str]:
    """Partitions and the migration ledger: nobody but the owner may touch them directly."""
    rows = fetch_rows(conn, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
          AND (c.relispartition OR c.relname = 'schema_migrations')
        ORDER BY c.relname""", (schema,))
    return [str(name) for (name,) in rows]


def _schema_exists(conn: Conn, schema: str) -> bool:
    return bool(fetch_rows(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)))


def _role_attributes(conn: Conn, role: str) -> dict[str, bool] | None:
    columns = list(_ROLE_ATTRIBUTES)
    rows = fetch_rows(conn, sql.SQL("SELECT {} FROM pg_roles WHERE rolname = %s").format(
        sql.SQL(", ").join(map(sql.Identifier, columns))), (role,))
    return dict(zip(columns, rows[0], strict=True)) if rows else None


def _ensure_role(conn: Conn, role: str, desired: dict[str, bool],
                 password: str | None = None) -> None:
    """Create `role` if missing and converge its attributes (and password when given)."""
    if _role_attributes(conn, role) is None:
        try:
            with conn.transaction():  # savepoint: a concurrent replica may create it first
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        except psycopg.errors.DuplicateObject:
            pass
    current = _role_attributes(conn, role) or {}
    # Only name attributes that differ: a non-superuser admin may not even mention
    # SUPERUSER/BYPASSRLS/REPLICATION, but it never needs to when they are already off.
    options: list[sql.Composable] = [sql.SQL(keyword if desired[column] else f"NO{keyword}")
               for column, keyword in _ROLE_ATTRIBUTES.items()
               if column in desired and current.get(column) != desired[column]]
    if password is not None:
        # libpq computes the SCRAM verifier client side; only that reaches the server and its
        # logs. PASSWORD takes no bind parameter, hence the literal.
        verifier = conn.pgconn.encrypt_password(
            password.encode(), role.encode(), b"scram-sha-256").decode()
        options.append(sql.SQL("PASSWORD {}").format(sql.Literal(verifier)))
    if options:
        conn.execute(sql.SQL("ALTER ROLE {} WITH {}").format(
            sql.Identifier(role), sql.SQL(" ").join(options)))


def _grant_tables(conn: Conn, schema: str, role: str) -> None:
    """USAGE on `schema` and DML on its tenant tables for `role`; nothing on partitions.

    Deliberately no ALTER DEFAULT PRIVILEGES: those would also grant every future partition,
    and a partition queried directly is not covered by its parent's policy. Callers re-run
    this after each migration or new collection instead.
    """
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
        sql.Identifier(schema), sql.Identifier(role)))
    for table in tenant_tables(conn, schema):
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
            DML, sql.Identifier(schema, table), sql.Identifier(role)))
    for table in _private_tables(conn, schema):
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(
            sql.Identifier(schema, table), sql.Identifier(role)))


def _own_schema(conn: Conn, schema: str) -> None:
    """Make the admin own `schema` and its tables, so no tenant role can ALTER or disable RLS."""
    rows = fetch_rows(conn, """
        SELECT n.nspowner = current_user::regrole,
               array(SELECT c.relname FROM pg_class c
                     WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p')
                       AND c.relowner <> current_user::regrole ORDER BY c.relname)
        FROM pg_namespace n WHERE n.nspname = %s""", (schema,))
    owned, foreign_tables = rows[0]
    if not owned:
        conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO CURRENT_USER").format(
            sql.Identifier(schema)))
    for table in foreign_tables:
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO CURRENT_USER").format(
            sql.Identifier(schema, table)))


def _require_shared(conn: Conn) -> None:
    if not _schema_exists(conn, SHARED_SCHEMA) or _role_attributes(conn, APP_ROLE) is None:
        raise RuntimeError(f"schema {SHARED_SCHEMA!r} or role {APP_ROLE!r} missing:"
                           " run bootstrap_shared() first")


def _upsert_tenant_row(conn: Conn, schema: str, tenant: str, isolation: Isolation) -> None:
    with tenant_transaction(conn, tenant):
        conn.execute(sql.SQL("""
            INSERT INTO {} AS t (tenant_id, isolation, state) VALUES (%s, %s, 'active')
            ON CONFLICT (tenant_id) DO UPDATE
               SET isolation = EXCLUDED.isolation, state = 'active', updated_at = now()
             WHERE (t.isolation, t.state) IS DISTINCT FROM (EXCLUDED.isolation, 'active')
        """).format(sql.Identifier(schema, "tenants")), (tenant, isolation))


def _terminate_sessions(conn: Conn, role: str) -> None:
    # Wait up to 5 s per backend so that callers (and tests) observe the sessions gone.
    fetch_rows(conn, """
        SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
        WHERE usename = %s AND pid <> pg_backend_pid()""", (role,))


# --- shared schema and tenants ----------------------------------------------------------------


def grant_app_role(conn: Conn, schema: str) -> None:
    """Give APP_ROLE USAGE on `schema` and DML on its tenant tables (never on partitions)."""
    validate_identifier(schema)
    with conn.transaction():
        _grant_tables(conn, schema, APP_ROLE)


def bootstrap_shared(conn: Conn) -> list[int]:
    """Create APP_ROLE, migrate the shared schema, its partitions and grants; return versions."""
    with conn.transaction():
        _ensure_role(conn, APP_ROLE, {"rolcanlogin": False, **_LOCKED_DOWN})
    applied = migrate(conn, SHARED_SCHEMA)
    ensure_partitions(conn, SHARED_SCHEMA)
    with conn.transaction():
        _grant_tables(conn, SHARED_SCHEMA, APP_ROLE)
        # PG15+ already ships this default; older clusters let every role create in public.
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    return applied


def ensure_pool_tenant(conn: Conn, tenant: str, isolation: Isolation = "pool") -> None:
    """Upsert the tenant's row in the shared tenants table as active."""
    validate_tenant_id(tenant)
    _require_shared(conn)
    _upsert_tenant_row(conn, SHARED_SCHEMA, tenant, isolation)


def ensure_bridge_tenant(conn: Conn, tenant: str, password: str) -> None:
    """Role and schema `tenant_<tenant>`, migrated, granted to that role only; password reset.

    Does not touch the shared registry row; `ensure_pool_tenant(conn, tenant, "bridge")` does.
    """
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    if not password:
        raise ValueError("a bridge tenant needs a non-empty password")
    _require_shared(conn)
    with conn.transaction():
        # NOINHERIT: even if someone grants it a group role, it does not silently gain rights.
        _ensure_role(conn, role, {"rolcanlogin": True, "rolinherit": False, **_LOCKED_DOWN},
                     password)
    migrate(conn, schema)
    ensure_partitions(conn, schema)
    with conn.transaction():
        _own_schema(conn, schema)
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(
            sql.Identifier(schema)))
        _grant_tables(conn, schema, role)
        (database,) = fetch_rows(conn, "SELECT current_database()")[0]
        db = sql.Identifier(database)
        conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(db))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
            db, sql.Identifier(APP_ROLE), sql.Identifier(role)))
    # The shared registry row (where the data lives) is the caller's to set: during an
    # isolation upgrade it flips only after the copy is verified.
    _upsert_tenant_row(conn, schema, tenant, "bridge")


# --- collections ------------------------------------------------------------------------------


def ensure_collection(
    conn: Conn,
    tenant: str,
    location: Location,
    dimensions: int,
    m: int,
    ef_construction: int,
    pool_index: PoolIndex = "partial",
    *,
    schema: str | None = None,
) -> str:
    """Create or converge the tenant's embeddings table and HNSW index; return `schema.table`.

    location="schema": `<schema>.embeddings` in the tenant's bridge schema (or `schema`, e.g.
    the `tenantry` schema of a silo database, then granted to APP_ROLE).
    location="shared": pool tenants share `tenantry.tenant_embeddings_d<dims>`; `pool_index`
    picks one partial HNSW index per tenant ("partial") or one index for the table ("shared",
    searched with iterative scans); switching to "shared" drops the tenant's partial index.
    An index whose m/ef_construction differ from the request is rebuilt.
    """
    validate_tenant_id(tenant)
    _check_dimensions(dimensions)
    if not 2 <= m <= 100:
        raise ValueError(f"m must be within 2..100, got {m}")
    if not 2 * m <= ef_construction <= 1000:
        raise ValueError(f"ef_construction must be within 2*m..1000, got {ef_construction}")
    if location == "shared":
        target, table, grantee = SHARED_SCHEMA, shared_embeddings_table(dimensions), APP_ROLE
    elif location == "schema":
        target = validate_identifier(schema) if schema else bridge_schema(tenant)
        table = SCHEMA_EMBEDDINGS
        grantee = bridge_role(tenant) if target == bridge_schema(tenant) else APP_ROLE
    else:
        raise ValueError(f"unknown collection location {location!r}")
    if pool_index not in ("partial", "shared"):
        raise ValueError(f"unknown pool index strategy {pool_index!r}")
    if not _schema_exists(conn, target):
        raise RuntimeError(f"schema {target!r} missing: provision the tenant first")

    with conn.transaction():
        operator_lock(conn, f"collection:{target}.{table}")
        _ensure_embeddings_table(conn, target, table, dimensions)
        if location == "schema":
            _ensure_hnsw_index(conn, target, table, f"{table}_hnsw", m, ef_construction, None)
        elif pool_index == "partial":
            _ensure_hnsw_index(conn, target, table, pool_index_name(dimensions, tenant),
                               m, ef_construction, tenant)
        else:
            _ensure_hnsw_index(conn, target, table, pool_index_name(dimensions, None),
                               m, ef_construction, None)
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(
                sql.Identifier(target, pool_index_name(dimensions, tenant))))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(target), sql.Identifier(grantee)))
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
            DML, sql.Identifier(target, table), sql.Identifier(grantee)))
    return f"{target}.{table}"


def _ensure_embeddings_table(conn: Conn, schema: str, table: str, dimensions: int) -> None:
    rows = fetch_rows(conn, """
        SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'embedding'
          AND NOT a.attisdropped""", (schema, table))
    if rows and rows[0][0] != f"vector({dimensions})":
        raise CollectionMismatch(
            f"{schema}.{table}.embedding is {rows[0][0]}, not vector({dimensions}):"
            " re-embedding into a new collection is needed")
    conn.execute(sql.SQL("""
        CREATE TABLE IF NOT EXISTS {} (
            tenant_id   text NOT NULL DEFAULT current_setting('app.current_tenant', true),
            id          uuid NOT NULL DEFAULT gen_random_uuid(),
            document_id uuid,
            content     text NOT NULL DEFAULT '',
            metadata    jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            embedding   public.vector({}) NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id)
        )""").format(sql.Identifier(schema, table), sql.Literal(dimensions)))
    ensure_tenant_rls(conn, schema, table)


def _ensure_hnsw_index(conn: Conn, schema: str, table: str, name: str, m: int,
                       ef_construction: int, tenant: str | None) -> None:
    """Create the cosine HNSW index, or rebuild it when its parameters or shape differ."""
    rows = fetch_rows(conn, """
        SELECT coalesce(c.reloptions, '{}'), i.indisvalid, am.amname,
               pg_get_expr(i.indpred, i.indrelid), t.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_am am ON am.oid = c.relam
        WHERE n.nspname = %s AND c.relname = %s""", (schema, name))
    wanted_options = {f"m={m}", f"ef_construction={ef_construction}"}
    predicate = None if tenant is None else sql.SQL("WHERE tenant_id = {}").format(
        sql.Literal(tenant))
    if rows:
        options, valid, method, current_predicate, on_table = rows[0]
        same_shape = (tenant is None) == (current_predicate is None)
        if (valid and method == "hnsw" and on_table == table and same_shape
                and set(options) == wanted_options):
            return
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name)))
    conn.execute(sql.SQL(
        "CREATE INDEX {} ON {} USING hnsw (embedding public.vector_cosine_ops)"
        " WITH (m = {}, ef_construction = {}) {}"
    ).format(sql.Identifier(name), sql.Identifier(schema, table), sql.Literal(m),
             sql.Literal(ef_construction), predicate or sql.SQL("")))


def _split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.partition(".")
    if not name:
        raise ValueError(f"expected a schema-qualified table, got {table!r}")
    return validate_identifier(schema), validate_identifier(name)


def _is_shared_table(schema: str, name: str) -> bool:
    return schema == SHARED_SCHEMA and _SHARED_EMBEDDINGS.fullmatch(name) is not None


def search_sql(tenant: str, table: str) -> sql.Composed:
    """The k-NN query: params `q` (vector) and `k`. Shared tables filter on the tenant literal.

    A literal (not a parameter) so that the planner can prove the partial index predicate
    `tenant_id = '<tenant>'`, also for prepared statements; RLS filters rows either way.
    The materialised CTE re-sorts results that iterative scans return in relaxed order.
    """
    validate_tenant_id(tenant)
    schema, name = _split_table(table)
    only_tenant = (sql.SQL("WHERE tenant_id = {}").format(sql.Literal(tenant))
                   if _is_shared_table(schema, name) else sql.SQL(""))
    return sql.SQL("""
        WITH hits AS MATERIALIZED (
            SELECT id, embedding OPERATOR(public.<=>) %(q)s AS distance FROM {table} {only_tenant}
            ORDER BY embedding OPERATOR(public.<=>) %(q)s LIMIT %(k)s
        )
        SELECT id, distance FROM hits ORDER BY distance, id""").format(
        table=sql.Identifier(schema, name), only_tenant=only_tenant)


def search_collection(
    conn: Conn,
    tenant: str,
    table: str,
    query_vector: Sequence[float] | Any,
    k: int,
    ef_search: int = 40,
) -> list[tuple[UUID, float]]:
    """The `k` nearest rows to `query_vector` (cosine distance) as the tenant sees them."""
    validate_tenant_id(tenant)
    schema, name = _split_table(table)
    if k < 1:
        raise ValueError("k must be >= 1")
    vector = query_vector if isinstance(query_vector, Vector) else Vector(list(query_vector))
    with tenant_transaction(conn, tenant):
        _register_vector_once(conn)
        # HNSW returns at most ef_search candidates, so never fewer than k (pgvector caps 1000).
        ef = min(max(ef_search, k), 1000)
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
        if _is_shared_table(schema, name):
            # With one index for all pool tenants most candidates are filtered out by the
            # tenant predicate; iterative scans keep searching until k rows survive.
            conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
        rows = fetch_rows(conn, search_sql(tenant, table), {"q": vector, "k": k})
    return [(row[0], float(row[1])) for row in rows]


def _register_vector_once(conn: Conn) -> None:
    try:
        conn.adapters.get_dumper(Vector, PyFormat.AUTO)
    except psycopg.ProgrammingError:
        register_vector(conn)


# --- retention and deletion -------------------------------------------------------------------


def _row_counts(conn: Conn, schema: str, tenant: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with tenant_transaction(conn, tenant):
        for table in tenant_tables(conn, schema):
            ((count,),) = fetch_rows(conn, sql.SQL(
                "SELECT count(*) FROM {} WHERE tenant_id = %s").format(
                sql.Identifier(schema, table)), (tenant,))
            if count:
                counts[table] = int(count)
    return counts


def _describe(schema: str, counts: dict[str, int]) -> str:
    listed = ", ".join(f"{table}={count}" for table, count in counts.items()) or "no rows"
    return f"{schema}: {listed}"


def _lock_out(conn: Conn, role: str) -> bool:
    """NOLOGIN, then cut the role's sessions; False when the role does not exist."""
    with conn.transaction():
        has_role = _role_attributes(conn, role) is not None
        if has_role:
            _ensure_role(conn, role, {"rolcanlogin": False})
    # NOLOGIN is committed before the sessions are cut, so none can reconnect in between.
    if has_role:
        _terminate_sessions(conn, role)
    return has_role


def retain_tenant(conn: Conn, tenant: str) -> str:
    """deletionPolicy Retain: lock the tenant out, keep its data; describe where it remains."""
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    kept: list[str] = []
    if _lock_out(conn, role):
        kept.append(f"role {role} (NOLOGIN)")
    for where in (SHARED_SCHEMA, schema):
        if not _schema_exists(conn, where):
            continue
        with tenant_transaction(conn, tenant):
            conn.execute(sql.SQL(
                "UPDATE {} SET state = 'retained', updated_at = now()"
                " WHERE tenant_id = %s AND state <> 'retained'").format(
                sql.Identifier(where, "tenants")), (tenant,))
        kept.append(("schema " if where == schema else "shared schema ")
                    + _describe(where, _row_counts(conn, where, tenant)))
    return f"tenant {tenant} retained: " + "; ".join(kept or ["nothing found"])


def delete_tenant_data(conn: Conn, tenant: str) -> None:
    """deletionPolicy Delete: drop the tenant's schema, role, shared rows and partial indexes."""
    validate_tenant_id(tenant)
    drop_bridge(conn, tenant)
    delete_shared_rows(conn, tenant)


def drop_bridge(conn: Conn, tenant: str) -> None:
    """Drop the bridge schema `tenant_<tenant>` with its data, and the role (idempotent)."""
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    has_role = _lock_out(conn, role)
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        if has_role:
            _drop_role(conn, role)


def delete_shared_rows(conn: Conn, tenant: str, keep_registry: bool = False) -> int:
    """Delete the tenant's rows from every shared table and drop its partial HNSW indexes.

    Returns the number of rows deleted. `keep_registry` keeps its `tenants` row (used when
    the data moved to a bridge schema or silo and the row records where it went).
    """
    validate_tenant_id(tenant)
    if not _schema_exists(conn, SHARED_SCHEMA):
        return 0
    deleted = 0
    with tenant_transaction(conn, tenant):
        for table in tenant_tables(conn, SHARED_SCHEMA):
            if keep_registry and table == "tenants":
                continue
            # Through the parent: every partition, the DEFAULT one included, is covered.
            deleted += conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
                sql.Identifier(SHARED_SCHEMA, table)), (tenant,)).rowcount
            match = _SHARED_EMBEDDINGS.fullmatch(table)
            if match:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(
                    SHARED_SCHEMA, pool_index_name(int(match.group(1)), tenant))))
    return deleted


def _drop_role(conn: Conn, role: str) -> None:
    (database,) = fetch_rows(conn, "SELECT current_database()")[0]
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
        sql.Identifier(database), sql.Identifier(role)))
    try:
        with conn.transaction():
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    except psycopg.errors.DependentObjectsStillExist:
        # Something granted by hand in this database: DROP OWNED revokes it (the role never
        # owns objects; the admin owns its schema and tables).
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

