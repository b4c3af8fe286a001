"""Provision, search, retain and delete tenant data in Postgres (sync psycopg, idempotent)."""

# Names (roles, schemas, tables, indexes) are composed with psycopg.sql.Identifier; values are
# bound parameters. Three exceptions, documented where they occur, where SQL takes no parameter:
# the tenant id as a literal in a partial index predicate and in the matching search filter
# (validated against TENANT_ID_PATTERN first; the planner must see the value to use the partial
# index); the sha256 of the validated tenant id in a bridge schema's pin constraint; and the
# role password in CREATE/ALTER ROLE, sent as a SCRAM verifier computed by libpq, so the clear
# text never reaches the server or its logs.
#
# The admin connection must see across tenants: a superuser, or the owner with BYPASSRLS.
#
# Catalog state (roles, memberships, ACLs, ownership, constraints) is read first and only what
# differs is changed: Postgres rewrites a catalog row on every GRANT/REVOKE/ALTER ROLE, even an
# unchanged one, without a row lock, so two such statements on the same object at once fail with
# "tuple concurrently updated". Changes are serialised by a lock on the role registry table
# (_converge); a settled reconcile takes no lock and writes nothing.

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import threading
import unicodedata
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, LiteralString, TypeVar
from uuid import UUID

import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.adapt import PyFormat
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    BILLING_TABLES,
    SHARED_SCHEMA,
    TENANT_ID_CONSTRAINT,
    TENANT_SETTING,
    Conn,
    bound_lock_wait,
    bridge_role,
    bridge_schema,
    ensure_check_constraint,
    ensure_partitions,
    ensure_tenant_rls,
    fetch_rows,
    legacy_bridge_name,
    migrate,
    opaque_name,
    operator_lock,
    tenant_transaction,
    validate_identifier,
    validate_tenant_id,
)

__all__ = [
    "ISOLATION_ORDER",
    "MAX_DIMENSIONS",
    "ROLE_REGISTRY",
    "SCHEMA_EMBEDDINGS",
    "CollectionMismatch",
    "CollectionRequest",
    "IsolationLowered",
    "PoolTenant",
    "RoleDropError",
    "UnmanagedRole",
    "UnmanagedSchema",
    "bootstrap_shared",
    "delete_shared_rows",
    "delete_tenant_data",
    "drop_bridge",
    "ensure_bridge_tenant",
    "ensure_collection",
    "ensure_pool_tenant",
    "grant_app_role",
    "pool_index_name",
    "provision_pool_tenant",
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
SCHEMA_EMBEDDINGS = "embeddings"
_SHARED_EMBEDDINGS = re.compile(r"^tenant_embeddings_d(\d{1,4})$")
_ROLE_ATTRIBUTES = {  # pg_roles column -> keyword when true (NO<keyword> when false)
    "rolcanlogin": "LOGIN", "rolinherit": "INHERIT", "rolsuper": "SUPERUSER",
    "rolbypassrls": "BYPASSRLS", "rolcreatedb": "CREATEDB", "rolcreaterole": "CREATEROLE",
    "rolreplication": "REPLICATION",
}
_LOCKED_DOWN = {"rolsuper": False, "rolbypassrls": False, "rolcreatedb": False,
                "rolcreaterole": False, "rolreplication": False}
# CREATE ROLE's defaults: only attributes that differ are named (see _role_actions).
_CREATE_DEFAULTS = {**_LOCKED_DOWN, "rolcanlogin": False, "rolinherit": True}
# Operator-created roles: name, OID (a role dropped and re-created by someone else is not ours)
# and the SCRAM verifier last set, to tell whether the password changed without reading
# pg_authid (superuser only). Readable by the admin only, like pg_authid itself.
ROLE_REGISTRY = "managed_roles"
PIN_CONSTRAINT = "tenant_id_pinned"
# Privileges as aclexplode() names them, and as SQL: the only privilege words ever composed.
_PRIVILEGE_SQL = {
    "SELECT": sql.SQL("SELECT"), "INSERT": sql.SQL("INSERT"), "UPDATE": sql.SQL("UPDATE"),
    "DELETE": sql.SQL("DELETE"), "TRUNCATE": sql.SQL("TRUNCATE"),
    "REFERENCES": sql.SQL("REFERENCES"), "TRIGGER": sql.SQL("TRIGGER"),
    "MAINTAIN": sql.SQL("MAINTAIN"), "USAGE": sql.SQL("USAGE"), "CREATE": sql.SQL("CREATE"),
    "CONNECT": sql.SQL("CONNECT"), "TEMPORARY": sql.SQL("TEMPORARY"),
}
TABLE_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES",
                              "TRIGGER", "MAINTAIN"})
SCHEMA_PRIVILEGES = frozenset({"USAGE", "CREATE"})
DATABASE_PRIVILEGES = frozenset({"CONNECT", "TEMPORARY", "CREATE"})
DML_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
_SCRAM_VERIFIER = re.compile(
    r"^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$")
AclKind = Literal["DATABASE", "SCHEMA", "TABLE"]
# An ACL is read from the object's catalog row, with the built-in default when it is NULL;
# the parameters are the object's (schema and) name.
_ACL_SOURCE: dict[AclKind, LiteralString] = {
    "DATABASE": "SELECT coalesce(datacl, acldefault('d', datdba)), datdba FROM pg_database"
                " WHERE datname = %s",
    "SCHEMA": "SELECT coalesce(nspacl, acldefault('n', nspowner)), nspowner FROM pg_namespace"
              " WHERE nspname = %s",
    "TABLE": "SELECT coalesce(c.relacl, acldefault('r', c.relowner)), c.relowner FROM pg_class c"
             " JOIN pg_namespace n ON n.oid = c.relnamespace"
             " WHERE n.nspname = %s AND c.relname = %s",
}
Action = Callable[[], object]


@dataclass(frozen=True)
class Check:
    """A read-only SQL expression with its positional parameters. Several go to the server as
    one SELECT (`ask`): a settled reconcile costs one round trip, not one per check."""

    expr: sql.Composable
    params: list[Any] = field(default_factory=list)


def ask(conn: Conn, *checks: Check) -> list[Any]:
    """The value of each check, in one query."""
    query = sql.SQL("SELECT {}").format(sql.SQL(", ").join(c.expr for c in checks))
    return list(fetch_rows(conn, query, [p for c in checks for p in c.params])[0])


T = TypeVar("T")


async def in_database(dsn: str, work: Callable[[Conn], T]) -> T:
    """Run `work` on an autocommit connection of `dsn`'s pool, in a worker thread.

    Pooled (bench/README.md, operator_scale: a connection per call cost more than the work
    of a settled reconcile). A connection comes back clean: one left in a transaction is
    rolled back by the pool, a broken one is discarded, and each is checked before use.
    """

    def run() -> T:
        with _pool(dsn).connection() as conn:
            return work(conn)

    return await asyncio.to_thread(run)


_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()
# Connections per DSN. A pool tenant's reconcile borrows one once, for a few milliseconds
# (bench/README.md, operator_scale): 8 serve worker_limit (32) reconciles with under 2 ms of
# waiting per tenant (psycopg-pool's counters; asyncio's default executor, 6 threads on 2
# cores, runs them), and more would only add Postgres backends competing for 2 cores. Silo
# pools close idle connections after a minute.
POOL_MAX_SIZE = 8


def _pool(dsn: str) -> ConnectionPool:
    with _pools_lock:
        pool = _pools.get(dsn)
        if pool is None:
            pool = _pools[dsn] = ConnectionPool(
                dsn, min_size=0, max_size=POOL_MAX_SIZE, max_idle=60, num_workers=1,
                timeout=10, open=True, check=ConnectionPool.check_connection,
                kwargs={"autocommit": True, "connect_timeout": 10})
        return pool


def close_pools() -> None:
    """Close every pool (operator shutdown); the next in_database opens a new one."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


ISOLATION_ORDER: tuple[Isolation, ...] = ("pool", "bridge", "silo")


class IsolationLowered(RuntimeError):
    """The registry already records a higher isolation than the one asked for."""

    def __init__(self, tenant: str, recorded: str, requested: str) -> None:
        super().__init__(
            f"tenant {tenant}: its data lives at {recorded}; refusing to record {requested}"
            " (isolation is never lowered: restore spec.isolation to "
            f"{recorded} or higher)")
        self.recorded = recorded


class CollectionMismatch(ValueError):
    """An existing collection cannot be converged to the requested one (e.g. other dimensions)."""


class UnmanagedRole(RuntimeError):
    """A role of the tenant's name exists that the operator did not create: not taken over."""


class UnmanagedSchema(RuntimeError):
    """A bridge schema of the tenant's name exists that someone else made: not adopted."""


class RoleDropError(RuntimeError):
    """The tenant's data is gone but its role could not be dropped yet (retry)."""


# --- names ------------------------------------------------------------------------------------


def shared_embeddings_table(dimensions: int) -> str:
    """The pool tenants' embeddings table for `dimensions` in the shared schema."""
    _check_dimensions(dimensions)
    return f"tenant_embeddings_d{dimensions}"


def pool_index_name(dimensions: int, tenant: str | None) -> str:
    """HNSW index on the shared table: per tenant (partial) when `tenant` is given, else whole.

    A partial index's name is opaque (opaque_name), 4 + 4 + 1 + 34 + 5 = 48 characters at
    most; its predicate, which every login can read in pg_indexes, still names the tenant.
    """
    _check_dimensions(dimensions)
    if tenant is None:
        return f"tenant_embeddings_d{dimensions}_hnsw"
    return f"emb_d{dimensions}_{opaque_name('pool-index', tenant)}_hnsw"


def _partial_index_names(dimensions: int, tenant: str) -> list[str]:
    """Every name the tenant's partial index may have: the current and the legacy one."""
    return [pool_index_name(dimensions, tenant), f"emb_d{dimensions}_{tenant}_hnsw"]


def _drop_partial_indexes(conn: Conn, dimensions: int, tenant: str,
                          keep: str | None = None) -> None:
    for name in _partial_index_names(dimensions, tenant):
        if name != keep:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(
                sql.Identifier(SHARED_SCHEMA, name)))


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


# --- serialised catalog changes ---------------------------------------------------------------


def _registry() -> sql.Identifier:
    return sql.Identifier(SHARED_SCHEMA, ROLE_REGISTRY)


def _ensure_registry(conn: Conn) -> None:
    """Create the role registry (after migrating the shared schema), adopting legacy roles.

    Roles created before the registry existed are adopted once, when it is created, if they
    are what the operator made: `tenant_<id>` next to an admin-owned schema of the same name.
    """
    if fetch_rows(conn, "SELECT to_regclass(%s)", (f"{SHARED_SCHEMA}.{ROLE_REGISTRY}",))[0][0]:
        return
    try:
        with conn.transaction():
            conn.execute(sql.SQL("""
                CREATE TABLE {} (
                    role_name  text PRIMARY KEY,
                    role_oid   oid NOT NULL,
                    verifier   text,
                    created_at timestamptz NOT NULL DEFAULT now()
                )""").format(_registry()))
            conn.execute(sql.SQL("""
                INSERT INTO {} (role_name, role_oid)
                SELECT r.rolname, r.oid FROM pg_roles r
                JOIN pg_namespace n ON n.nspname = r.rolname
                WHERE r.rolname ~ '^tenant_[a-z][a-z0-9]{{0,39}}$'
                  AND n.nspowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
            """).format(_registry()))
    except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
        pass  # a concurrent replica created it first


def _converge(conn: Conn, plan: Callable[[], list[Action]]) -> bool:
    """Run the actions `plan` returns; True if there were any.

    A settled state plans nothing and writes nothing. Otherwise the plan is made again under
    the registry lock (self-conflicting, held until commit), which serialises catalog changes
    of concurrent reconciles, so that none sees its catalog row "concurrently updated".
    """
    with conn.transaction():
        if not plan():
            return False
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(_registry()))
        # An action may lock a tenant's table, which its login can hold: every other tenant's
        # changes wait for this registry lock, so that wait is bounded.
        bound_lock_wait(conn)
        for action in plan():
            action()
    return True


def _run(conn: Conn, query: sql.Composable, params: Sequence[Any] | None = None) -> Action:
    return partial(conn.execute, query, params)


def _held_privileges(kind: AclKind, target: Sequence[str], grantee: str | None) -> Check:
    """The privileges (text[]) that `grantee` (None: PUBLIC) holds on the object from its
    owner: those are what the owner, or a superuser acting as it, grants and revokes."""
    return Check(sql.SQL("""
        (SELECT coalesce(array_agg(DISTINCT a.privilege_type::text), '{{}}'::text[])
         FROM ({}) AS o(acl, owner), aclexplode(o.acl) AS a
         WHERE a.grantor = o.owner
           AND a.grantee = CASE WHEN %s::text IS NULL THEN 0
                           ELSE (SELECT oid FROM pg_roles WHERE rolname = %s) END)
        """).format(sql.SQL(_ACL_SOURCE[kind])), [*target, grantee, grantee])


def _acl_settled(kind: AclKind, target: Sequence[str], grantee: str | None,
                 wanted: Collection[str], managed: Collection[str]) -> Check:
    """True when `grantee` holds exactly `wanted` of `managed` (what _acl_actions converges)."""
    held = _held_privileges(kind, target, grantee)
    return Check(sql.SQL("""
        ((SELECT coalesce(array_agg(p ORDER BY p COLLATE "C"), '{{}}'::text[])
          FROM unnest({}) AS p WHERE p = ANY(%s::text[])) = %s::text[])""").format(held.expr),
        [*held.params, sorted(managed), sorted(wanted)])


def _acl_actions(conn: Conn, kind: AclKind, target: Sequence[str], grantee: str | None,
                 wanted: Collection[str], managed: Collection[str]) -> list[Action]:
    """GRANT what `grantee` (None: PUBLIC) lacks of `wanted`, REVOKE the rest of `managed`.

    Only privileges granted by the object's owner count (those are what the owner, or a
    superuser acting as it, grants and revokes).
    """
    if not set(wanted) <= set(managed) <= set(_PRIVILEGE_SQL):
        raise ValueError(f"unexpected privileges {sorted(set(managed) - set(_PRIVILEGE_SQL))}")
    held = set(ask(conn, _held_privileges(kind, target, grantee))[0])
    to_grant, to_revoke = set(wanted) - held, (held & set(managed)) - set(wanted)
    obj = sql.SQL("{} {}").format(sql.SQL(kind), sql.Identifier(*target))
    who = sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)
    actions: list[Action] = []
    for statement, privileges in ((sql.SQL("GRANT {} ON {} TO {}"), to_grant),
                                  (sql.SQL("REVOKE {} ON {} FROM {}"), to_revoke)):
        if privileges:
            listed = sql.SQL(", ").join(_PRIVILEGE_SQL[p] for p in sorted(privileges))
            actions.append(_run(conn, statement.format(listed, obj, who)))
    return actions


# --- roles ------------------------------------------------------------------------------------


def _registered_oid(conn: Conn, role: str) -> int | None:
    if not fetch_rows(conn, "SELECT to_regclass(%s)", (f"{SHARED_SCHEMA}.{ROLE_REGISTRY}",))[0][0]:
        return None  # a database never bootstrapped: nothing in it is the operator's
    rows = fetch_rows(conn, sql.SQL("SELECT role_oid FROM {} WHERE role_name = %s").format(
        _registry()), (role,))
    return int(rows[0][0]) if rows else None


def _role_oid(conn: Conn, role: str) -> int | None:
    rows = fetch_rows(conn, "SELECT oid FROM pg_roles WHERE rolname = %s", (role,))
    return int(rows[0][0]) if rows else None


def _is_managed(conn: Conn, role: str) -> bool:
    """True when `role` exists and is the one the operator created (same OID as registered)."""
    oid = _role_oid(conn, role)
    return oid is not None and oid == _registered_oid(conn, role)


def _scram_matches(password: str, verifier: str) -> bool:
    """Whether `password` is the one behind a SCRAM-SHA-256 verifier (RFC 5802/7677)."""
    match = _SCRAM_VERIFIER.fullmatch(verifier)
    if not match:
        return False
    iterations, salt, stored_key, server_key = (
        int(match[1]), *(base64.b64decode(part) for part in match.groups()[1:]))
    # libpq applies SASLprep; NFKC is its core (exact for the ASCII passwords we generate).
    normalised = unicodedata.normalize("NFKC", password).encode()
    salted = hashlib.pbkdf2_hmac("sha256", normalised, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return (hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
            and hmac.compare_digest(hmac.digest(salted, b"Server Key", "sha256"), server_key))


def _current_verifier(conn: Conn, role: str) -> str | None:
    """The role's password verifier: from pg_authid when readable, else as last recorded."""
    if fetch_rows(conn, "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')")[0][0]:
        rows = fetch_rows(conn, "SELECT rolpassword FROM pg_catalog.pg_authid"
                                " WHERE rolname = %s", (role,))
    else:
        rows = fetch_rows(conn, sql.SQL("SELECT verifier FROM {} WHERE role_name = %s").format(
            _registry()), (role,))
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


def _membership_actions(conn: Conn, role: str, strip_members: bool) -> list[Action]:
    """Revoke every membership of `role` in other roles (NOINHERIT does not stop SET ROLE),
    and with `strip_members` every other role's membership in it (the admin's excepted)."""
    rows = fetch_rows(conn, """
        SELECT g.rolname, m.rolname, gr.rolname FROM pg_auth_members am
        JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
        JOIN pg_roles gr ON gr.oid = am.grantor
        WHERE m.rolname = %(role)s
           OR (%(strip)s AND g.rolname = %(role)s AND m.rolname <> current_user)
        ORDER BY 1, 2, 3""", {"role": role, "strip": strip_members})
    return [_run(conn, sql.SQL("REVOKE {} FROM {} GRANTED BY {} CASCADE").format(
        sql.Identifier(group), sql.Identifier(member), sql.Identifier(grantor)))
        for group, member, grantor in rows]


def _role_actions(conn: Conn, role: str, desired: dict[str, bool], password: str | None,
                  registered: bool, strip_members: bool) -> list[Action]:
    """What `role` needs to match `desired`; raises UnmanagedRole for a role not ours."""
    ident = sql.Identifier(role)
    current = _role_attributes(conn, role)
    if current is not None and registered and not _is_managed(conn, role):
        raise UnmanagedRole(
            f"role {role} exists but the Tenantry operator did not create it (it is not in"
            f" {SHARED_SCHEMA}.{ROLE_REGISTRY}); it is not taken over because it may carry"
            f" memberships or rights of its own. Drop or rename that role and the operator"
            f" creates it afresh; or, if you know it is this tenant's role, add its name and"
            f" OID (from pg_roles) to {SHARED_SCHEMA}.{ROLE_REGISTRY}")
    verifier = None
    if password is not None and (current is None or not _scram_matches(
            password, _current_verifier(conn, role) or "")):
        # libpq computes the SCRAM verifier client side; only that reaches the server and its
        # logs. PASSWORD takes no bind parameter, hence the literal.
        verifier = conn.pgconn.encrypt_password(
            password.encode(), role.encode(), b"scram-sha-256").decode()
    password_option = ([sql.SQL("PASSWORD {}").format(sql.Literal(verifier))]
                       if verifier else [])
    if current is None:
        options = [sql.SQL(keyword if desired[column] else f"NO{keyword}")
                   for column, keyword in _ROLE_ATTRIBUTES.items()
                   if column in desired and desired[column] != _CREATE_DEFAULTS[column]]
        actions = [_run(conn, sql.SQL("CREATE ROLE {} WITH {}").format(
            ident, sql.SQL(" ").join([*options, *password_option])))]
        if registered:  # a stale row (the role was dropped by hand) is taken over: we create it
            actions.append(_run(conn, sql.SQL("""
                INSERT INTO {} (role_name, role_oid, verifier)
                SELECT rolname, oid, %s FROM pg_roles WHERE rolname = %s
                ON CONFLICT (role_name) DO UPDATE
                   SET role_oid = EXCLUDED.role_oid, verifier = EXCLUDED.verifier""").format(
                _registry()), (verifier, role)))
        return actions
    # Only name attributes that differ: a non-superuser admin may not even mention
    # SUPERUSER/BYPASSRLS/REPLICATION, but it never needs to when they are already off.
    options = [sql.SQL(keyword if desired[column] else f"NO{keyword}")
               for column, keyword in _ROLE_ATTRIBUTES.items()
               if column in desired and current[column] != desired[column]]
    actions = []
    if options or password_option:
        actions.append(_run(conn, sql.SQL("ALTER ROLE {} WITH {}").format(
            ident, sql.SQL(" ").join([*options, *password_option]))))
    if verifier and registered:
        actions.append(_run(conn, sql.SQL("UPDATE {} SET verifier = %s WHERE role_name = %s")
                            .format(_registry()), (verifier, role)))
    return actions + _membership_actions(conn, role, strip_members)


def _ensure_role(conn: Conn, role: str, desired: dict[str, bool], password: str | None = None,
                 *, registered: bool = True, strip_members: bool = True) -> None:
    """Create `role` if missing, else converge its attributes, password and memberships.

    `registered` roles are the operator's own: recorded at creation, and a pre-existing role
    of that name that is not recorded is refused (UnmanagedRole) rather than taken over.
    """
    _converge(conn, lambda: _role_actions(conn, role, desired, password, registered,
                                          strip_members))


# --- grants and ownership ---------------------------------------------------------------------


def _grant_actions(conn: Conn, schema: str, role: str,
                   read_only: Collection[str] = ()) -> list[Action]:
    """USAGE on `schema` and DML on its tenant tables (SELECT on `read_only` ones) for `role`;
    nothing on partitions and the migration ledger; any other table privilege revoked.

    Deliberately no ALTER DEFAULT PRIVILEGES: those would also grant every future partition,
    and a partition queried directly is not covered by its parent's policy. Callers re-run
    this after each migration or new collection instead.
    """
    actions = _acl_actions(conn, "SCHEMA", (schema,), role, {"USAGE"}, SCHEMA_PRIVILEGES)
    for table in tenant_tables(conn, schema):
        wanted = {"SELECT"} if table in read_only else DML_PRIVILEGES
        actions += _acl_actions(conn, "TABLE", (schema, table), role, wanted, TABLE_PRIVILEGES)
    for table in _private_tables(conn, schema):
        actions += _acl_actions(conn, "TABLE", (schema, table), role, (), TABLE_PRIVILEGES)
    return actions


def _ownership_actions(conn: Conn, schema: str) -> list[Action]:
    """Make the admin own `schema` and its tables, so no tenant role can ALTER or disable RLS."""
    rows = fetch_rows(conn, """
        SELECT n.nspowner = current_user::regrole,
               array(SELECT c.relname FROM pg_class c
                     WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p')
                       AND c.relowner <> current_user::regrole ORDER BY c.relname)
        FROM pg_namespace n WHERE n.nspname = %s""", (schema,))
    owned, foreign_tables = rows[0]
    actions = [] if owned else [_run(conn, sql.SQL("ALTER SCHEMA {} OWNER TO CURRENT_USER")
                                     .format(sql.Identifier(schema)))]
    return actions + [_run(conn, sql.SQL("ALTER TABLE {} OWNER TO CURRENT_USER").format(
        sql.Identifier(schema, table))) for table in foreign_tables]


def _metering_actions(conn: Conn, schema: str) -> list[Action]:
    """APP_ROLE (the runtime) may insert usage rows into a bridge schema, and nothing else there.

    Only INSERT: ON CONFLICT DO NOTHING needs no more, and the runtime never reads a tenant's
    bridge tables with its shared role. RLS and the schema's pin still hold it to one tenant.
    """
    return [*_acl_actions(conn, "SCHEMA", (schema,), APP_ROLE, {"USAGE"}, SCHEMA_PRIVILEGES),
            *_acl_actions(conn, "TABLE", (schema, "ai_usage_logs"), APP_ROLE, {"INSERT"},
                          TABLE_PRIVILEGES)]


def _pin_actions(conn: Conn, schema: str, tenant: str) -> list[Action]:
    """CHECK that tenant_id is the tenant's, on every tenant table of its bridge schema.

    The tenant controls both app.current_tenant and tenant_id there, so RLS alone is advisory:
    the pin makes a row of another tenant impossible. Constraints are readable by every login,
    so the pin compares a sha256 of tenant_id (it reveals no more than the opaque schema name
    does); the digest, computed from the validated id, is written as a literal: a constraint
    takes no parameter.
    """
    digest = hashlib.sha256(validate_tenant_id(tenant).encode()).hexdigest()
    check = sql.SQL("sha256(convert_to(tenant_id, 'UTF8')) = {}::bytea").format(
        sql.Literal(f"\\x{digest}"))
    tables = tenant_tables(conn, schema)
    rows = fetch_rows(conn, """
        SELECT c.relname FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND co.conname = %s
          AND strpos(pg_get_constraintdef(co.oid), %s) > 0""",
        (schema, PIN_CONSTRAINT, digest))
    pinned = {str(name) for (name,) in rows}
    return [partial(ensure_check_constraint, conn, schema, table, PIN_CONSTRAINT, check,
                    digest) for table in tables if table not in pinned]


def _own_databases(conn: Conn) -> list[str]:
    """The databases the admin owns (all, for a superuser) that accept connections."""
    return [str(name) for (name,) in fetch_rows(conn, """
        SELECT datname FROM pg_database
        WHERE datallowconn AND pg_has_role(current_user, datdba, 'MEMBER') ORDER BY datname""")]


def _database_actions(conn: Conn, database: str) -> list[Action]:
    """Nobody connects or creates temporary tables through PUBLIC in `database`.

    CONNECT: a tenant login that reaches `postgres` or `template1` could leave a large object
    there that blocks dropping its role. TEMPORARY: a temporary table has no RLS and shadows
    unqualified names for later requests on the same pooled connection. Roles get CONNECT on
    the shared database explicitly (APP_ROLE here, bridge roles in ensure_bridge_tenant).
    Databases created later get PUBLIC's defaults back until the next bootstrap (maintenance).
    """
    actions = _acl_actions(conn, "DATABASE", (database,), None, (), DATABASE_PRIVILEGES)
    if database == fetch_rows(conn, "SELECT current_database()")[0][0]:
        actions += _acl_actions(conn, "DATABASE", (database,), APP_ROLE, {"CONNECT"},
                                DATABASE_PRIVILEGES)
    return actions


def _shared_ready() -> Check:
    """bootstrap_shared() has run: the shared schema, its role registry and APP_ROLE exist."""
    return Check(sql.SQL("""
        (to_regnamespace(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL
         AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s))"""),
        [SHARED_SCHEMA, f"{SHARED_SCHEMA}.{ROLE_REGISTRY}", APP_ROLE])


def _require_shared(conn: Conn) -> None:
    if not ask(conn, _shared_ready())[0]:
        raise RuntimeError(f"schema {SHARED_SCHEMA!r}, its role registry or role {APP_ROLE!r}"
                           " missing: run bootstrap_shared() first")


def _upsert_tenant_row(conn: Conn, schema: str, tenant: str, isolation: Isolation) -> None:
    """Record the tenant as active at `isolation`; the recorded isolation never goes down.

    A reconcile working from a stale spec (or a second operator) must not point the registry
    back at a location whose data an upgrade already moved away: that raises IsolationLowered.
    """
    if isolation not in ISOLATION_ORDER:
        raise ValueError(f"unknown isolation {isolation!r}")
    with tenant_transaction(conn, tenant):
        table = sql.Identifier(schema, "tenants")
        current = fetch_rows(conn, sql.SQL(
            "SELECT isolation, state FROM {} WHERE tenant_id = %s").format(table), (tenant,))
        if current == [(isolation, "active")]:
            return  # settled: not even a row lock
        if current and ISOLATION_ORDER.index(current[0][0]) > ISOLATION_ORDER.index(isolation):
            raise IsolationLowered(tenant, current[0][0], isolation)
        # The rank guard repeats the check atomically for a writer racing the SELECT above.
        written = conn.execute(sql.SQL("""
            INSERT INTO {} AS t (tenant_id, isolation, state) VALUES (%s, %s, 'active')
            ON CONFLICT (tenant_id) DO UPDATE
               SET isolation = EXCLUDED.isolation, state = 'active', updated_at = now()
             WHERE (t.isolation, t.state) IS DISTINCT FROM (EXCLUDED.isolation, 'active')
               AND array_position(%s::text[], t.isolation)
                   <= array_position(%s::text[], EXCLUDED.isolation)
        """).format(table), (tenant, isolation, list(ISOLATION_ORDER), list(ISOLATION_ORDER)))
        if written.rowcount == 0:
            now = fetch_rows(conn, sql.SQL(
                "SELECT isolation FROM {} WHERE tenant_id = %s").format(table), (tenant,))
            if now and now[0][0] != isolation:
                raise IsolationLowered(tenant, now[0][0], isolation)


def _terminate_sessions(conn: Conn, role: str) -> None:
    # Wait up to 5 s per backend so that callers (and tests) observe the sessions gone.
    fetch_rows(conn, """
        SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
        WHERE usename = %s AND pid <> pg_backend_pid()""", (role,))


# --- shared schema and tenants ----------------------------------------------------------------


def grant_app_role(conn: Conn, schema: str) -> None:
    """Give APP_ROLE USAGE on `schema` and DML on its tenant tables (never on partitions)."""
    validate_identifier(schema)
    _converge(conn, lambda: _grant_actions(conn, schema, APP_ROLE))


def bootstrap_shared(conn: Conn) -> list[int]:
    """Migrate the shared schema, create APP_ROLE, partitions, grants; return versions applied.

    Also revokes CONNECT and TEMPORARY from PUBLIC on every database the admin owns.
    """
    # A shared schema someone else made before the install (no registry of the admin's yet).
    owner = _foreign_owner(conn, SHARED_SCHEMA)
    if owner is not None and not fetch_rows(conn, """
            SELECT 1 FROM pg_class WHERE oid = to_regclass(%s)
              AND relowner = current_user::regrole""", (f"{SHARED_SCHEMA}.{ROLE_REGISTRY}",)):
        raise _unmanaged_schema(SHARED_SCHEMA, "the shared schema", owner)
    applied = migrate(conn, SHARED_SCHEMA)
    _ensure_registry(conn)
    # APP_ROLE is cluster-wide and may serve several databases (each with its own registry),
    # so it is not registered; it must be a member of nothing, while its members are the
    # runtime's logins.
    _ensure_role(conn, APP_ROLE, {"rolcanlogin": False, **_LOCKED_DOWN},
                 registered=False, strip_members=False)
    ensure_partitions(conn, SHARED_SCHEMA)
    _converge(conn, lambda: [
        *_grant_actions(conn, SHARED_SCHEMA, APP_ROLE),
        # PG15+ already ships this default; older clusters let every role create in public.
        *_acl_actions(conn, "SCHEMA", ("public",), None, (), {"CREATE"})])
    for database in _own_databases(conn):
        # One database at a time: one that is dropped meanwhile does not fail the others.
        with contextlib.suppress(psycopg.errors.InvalidCatalogName):
            _converge(conn, partial(_database_actions, conn, database))
    return applied


def ensure_pool_tenant(conn: Conn, tenant: str, isolation: Isolation = "pool") -> None:
    """Upsert the tenant's row in the shared tenants table as active."""
    validate_tenant_id(tenant)
    _require_shared(conn)
    _upsert_tenant_row(conn, SHARED_SCHEMA, tenant, isolation)


@dataclass(frozen=True)
class CollectionRequest:
    """A tenant's collection, as ensure_collection takes it."""

    dimensions: int
    m: int
    ef_construction: int
    pool_index: PoolIndex = "partial"


@dataclass(frozen=True)
class PoolTenant:
    """What provision_pool_tenant found and did."""

    recorded: Isolation | None  # the registry's isolation before the call (None: no row)
    collection: str | Exception | None = None  # its table, or why not (None: not asked for)


def provision_pool_tenant(conn: Conn, tenant: str,
                          collection: CollectionRequest | None) -> PoolTenant:
    """A pool tenant's registry row and collection, on one connection (one pool checkout).

    Settled, as on every resync, this is one read-only query: the registry row and every
    check of the collection. The admin bypasses RLS (see the top of this module), so the row
    is read without setting the tenant. When the registry records a higher isolation nothing
    is written: the caller reports it. A collection that cannot be made is returned, not
    raised, for the collection step to report.
    """
    validate_tenant_id(tenant)
    checks = [_shared_ready()]
    if collection is not None:
        table = shared_embeddings_table(collection.dimensions)
        checks += _collection_checks(
            tenant, SHARED_SCHEMA, table, APP_ROLE, collection.dimensions, collection.m,
            collection.ef_construction,
            _collection_index("shared", table, collection.dimensions, tenant,
                              collection.pool_index))
    query = sql.SQL("SELECT t.isolation, t.state, {} FROM (VALUES (1)) AS one"
                    " LEFT JOIN {} AS t ON t.tenant_id = %s").format(
        sql.SQL(", ").join(c.expr for c in checks), sql.Identifier(SHARED_SCHEMA, "tenants"))
    try:
        recorded, state, *settled = fetch_rows(
            conn, query, [*(p for c in checks for p in c.params), tenant])[0]
    except psycopg.errors.UndefinedTable:  # not bootstrapped: ensure_pool_tenant says so
        recorded, state, settled = None, None, [False]
    if recorded is not None and recorded != "pool":
        return PoolTenant(recorded)
    if (recorded, state) != ("pool", "active"):
        if settled[0]:  # bootstrapped: the row only
            _upsert_tenant_row(conn, SHARED_SCHEMA, tenant, "pool")
        else:
            ensure_pool_tenant(conn, tenant)
    if collection is None:
        return PoolTenant(recorded)
    if all(settled[1:]):
        return PoolTenant(recorded, f"{SHARED_SCHEMA}.{table}")
    try:
        made = ensure_collection(conn, tenant, "shared", collection.dimensions, collection.m,
                                 collection.ef_construction, collection.pool_index)
    except Exception as err:  # the collection step's to report, as when it made the call
        return PoolTenant(recorded, err)
    return PoolTenant(recorded, made)


def _rename_legacy(conn: Conn, tenant: str) -> None:
    """Give a bridge schema and role created under the legacy name `tenant_<id>` their
    opaque names (once; the role only if it is the operator's, the schema if the admin owns
    it). Sessions keep working; the Secret's username follows on the same reconcile."""
    legacy, schema, role = legacy_bridge_name(tenant), bridge_schema(tenant), bridge_role(tenant)

    def plan() -> list[Action]:
        actions: list[Action] = []
        if (fetch_rows(conn, """
                SELECT 1 FROM pg_namespace
                WHERE nspname = %s AND nspowner = current_user::regrole""", (legacy,))
                and not _schema_exists(conn, schema)):
            actions.append(_run(conn, sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                sql.Identifier(legacy), sql.Identifier(schema))))
        if _is_managed(conn, legacy) and _role_oid(conn, role) is None:
            actions.append(_run(conn, sql.SQL("ALTER ROLE {} RENAME TO {}").format(
                sql.Identifier(legacy), sql.Identifier(role))))
            actions.append(_run(conn, sql.SQL(
                "UPDATE {} SET role_name = %s WHERE role_name = %s").format(_registry()),
                (role, legacy)))
        return actions

    _converge(conn, plan)


def _bridge_actions(conn: Conn, tenant: str) -> list[Action]:
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    (database,) = fetch_rows(conn, "SELECT current_database()")[0]
    return [
        *_ownership_actions(conn, schema),
        *_acl_actions(conn, "SCHEMA", (schema,), None, (), SCHEMA_PRIVILEGES),
        # Its copy of the registry is the operator's to write, its usage and invoices the
        # platform's (BILLING_TABLES); the tenant may read them.
        *_grant_actions(conn, schema, role, read_only={"tenants", *BILLING_TABLES}),
        *_metering_actions(conn, schema),
        *_pin_actions(conn, schema, tenant),
        *_database_actions(conn, database),
        *_acl_actions(conn, "DATABASE", (database,), role, {"CONNECT"}, DATABASE_PRIVILEGES),
    ]


def _refuse_foreign_schema(conn: Conn, tenant: str) -> None:
    """Raise UnmanagedSchema when the tenant's bridge schema exists, someone else owns it and
    the operator never provisioned the tenant (its role is not in the registry).

    Its name is a public function of the tenant id, so it can be made before the Tenant, with
    objects of its maker (a trigger copying every row, grants to other roles) that taking
    over its ownership would keep. A schema of a provisioned tenant handed to another role by
    hand is taken back instead (_ownership_actions).
    """
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    owner = _foreign_owner(conn, schema)
    if owner is not None and _registered_oid(conn, role) is None:
        raise _unmanaged_schema(schema, f"tenant {tenant}'s bridge schema", owner)


def _foreign_owner(conn: Conn, schema: str) -> str | None:
    """The owner of `schema` when it exists and is not the admin."""
    rows = fetch_rows(conn, """
        SELECT pg_get_userbyid(nspowner) FROM pg_namespace
        WHERE nspname = %s AND nspowner <> current_user::regrole""", (schema,))
    return str(rows[0][0]) if rows else None


def _unmanaged_schema(schema: str, what: str, owner: str) -> UnmanagedSchema:
    return UnmanagedSchema(
        f"schema {schema} ({what}) exists, owned by {owner}, but the Tenantry operator did not"
        " create it; it is not adopted because its owner's objects (triggers, functions,"
        " grants) would stay, and a schema's owner may drop and replace any table in it."
        " Check what it holds, then drop it and the operator creates it afresh")


def ensure_bridge_tenant(conn: Conn, tenant: str, password: str) -> None:
    """Role and schema bridge_role/bridge_schema(tenant), migrated, granted to that role only;
    password set.

    Does not touch the shared registry row; `ensure_pool_tenant(conn, tenant, "bridge")` does.
    Raises UnmanagedRole when a role of that name exists that the operator did not create,
    UnmanagedSchema likewise for a schema.
    """
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    if not password:
        raise ValueError("a bridge tenant needs a non-empty password")
    _require_shared(conn)
    _rename_legacy(conn, tenant)
    _refuse_foreign_schema(conn, tenant)
    # NOINHERIT: even if someone grants it a group role, it does not silently gain rights
    # (and every reconcile revokes such memberships: SET ROLE would still reach them).
    _ensure_role(conn, role, {"rolcanlogin": True, "rolinherit": False, **_LOCKED_DOWN},
                 password)
    migrate(conn, schema)
    ensure_partitions(conn, schema)
    _converge(conn, lambda: _bridge_actions(conn, tenant))
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
    An index of the tenant's own (its schema's, or its partial one) whose m/ef_construction
    differ from the request is rebuilt. The one shared index belongs to no tenant: it is
    created with the first request's parameters and never rebuilt to follow another tenant's
    (that would lock every pool tenant out of searches on each resync).
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

    pinned = target == bridge_schema(tenant)

    def grants() -> list[Action]:
        return [
            *_acl_actions(conn, "SCHEMA", (target,), grantee, {"USAGE"}, SCHEMA_PRIVILEGES),
            *_acl_actions(conn, "TABLE", (target, table), grantee, DML_PRIVILEGES,
                          TABLE_PRIVILEGES),
            *(_pin_actions(conn, target, tenant) if pinned else [])]

    index = _collection_index(location, table, dimensions, tenant, pool_index)
    # Settled: read only, no lock (taking the lock row is itself a write), one round trip.
    if all(ask(conn, *_collection_checks(tenant, target, table, grantee, dimensions, m,
                                         ef_construction, index))) and not (
            pinned and _pin_actions(conn, target, tenant)):
        return f"{target}.{table}"
    with conn.transaction():
        operator_lock(conn, f"collection:{target}.{table}")
        bound_lock_wait(conn)  # a bridge tenant's login may hold its table
        _ensure_embeddings_table(conn, target, table, dimensions)
        if location == "schema":
            _ensure_hnsw_index(conn, target, table, f"{table}_hnsw", m, ef_construction, None)
        elif pool_index == "partial":
            name = pool_index_name(dimensions, tenant)
            _ensure_hnsw_index(conn, target, table, name, m, ef_construction, tenant)
            _drop_partial_indexes(conn, dimensions, tenant, keep=name)
        else:
            _ensure_hnsw_index(conn, target, table, pool_index_name(dimensions, None),
                               m, ef_construction, None, follow_parameters=False)
            _drop_partial_indexes(conn, dimensions, tenant)
        _converge(conn, grants)
    return f"{target}.{table}"


def _table_settled(schema: str, table: str, dimensions: int) -> Check:
    """The table exists with `vector(dimensions)`, RLS forced with its policy and check."""
    return Check(sql.SQL("""
        EXISTS (SELECT 1 FROM pg_attribute a
                JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'embedding'
                  AND NOT a.attisdropped AND format_type(a.atttypid, a.atttypmod) = %s
                  AND c.relrowsecurity AND c.relforcerowsecurity
                  AND EXISTS (SELECT 1 FROM pg_policy p
                              WHERE p.polrelid = c.oid AND p.polname = 'tenant_isolation')
                  AND EXISTS (SELECT 1 FROM pg_constraint co
                              WHERE co.conrelid = c.oid AND co.conname = %s))"""),
        [schema, table, f"vector({dimensions})", TENANT_ID_CONSTRAINT])


def _no_stray_partial_indexes(dimensions: int, tenant: str, keep: str) -> Check:
    names = [n for n in _partial_index_names(dimensions, tenant) if n != keep]
    return Check(sql.SQL("""
        NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = %s AND c.relname = ANY(%s::text[]))"""),
        [SHARED_SCHEMA, names])


def _collection_index(location: Location, table: str, dimensions: int, tenant: str,
                      pool_index: PoolIndex) -> tuple[str, str | None, bool]:
    """The collection's HNSW index: name, partial for which tenant, follows m/ef_construction."""
    if location == "schema":
        return f"{table}_hnsw", None, True
    if pool_index == "partial":
        return pool_index_name(dimensions, tenant), tenant, True
    return pool_index_name(dimensions, None), None, False


def _collection_checks(tenant: str, target: str, table: str, grantee: str, dimensions: int,
                       m: int, ef_construction: int,
                       index: tuple[str, str | None, bool]) -> list[Check]:
    """Everything ensure_collection converges, but a bridge schema's pins, as checks."""
    name, partial_for, follow = index
    return [
        _table_settled(target, table, dimensions),
        _index_settled(target, table, name, m, ef_construction, partial_for, follow),
        _no_stray_partial_indexes(dimensions, tenant, keep=name),
        _acl_settled("SCHEMA", (target,), grantee, {"USAGE"}, SCHEMA_PRIVILEGES),
        _acl_settled("TABLE", (target, table), grantee, DML_PRIVILEGES, TABLE_PRIVILEGES),
    ]


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
            tenant_id   text NOT NULL DEFAULT {},
            id          uuid NOT NULL DEFAULT gen_random_uuid(),
            document_id uuid,
            content     text NOT NULL DEFAULT '',
            metadata    jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            embedding   public.vector({}) NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id)
        )""").format(sql.Identifier(schema, table), TENANT_SETTING, sql.Literal(dimensions)))
    ensure_tenant_rls(conn, schema, table)  # with the tenant_id check


def _ensure_hnsw_index(conn: Conn, schema: str, table: str, name: str, m: int,
                       ef_construction: int, tenant: str | None,
                       follow_parameters: bool = True) -> None:
    """Create the cosine HNSW index, or rebuild it when its shape differs (or its parameters,
    with `follow_parameters`)."""
    if ask(conn, _index_settled(schema, table, name, m, ef_construction, tenant,
                                follow_parameters))[0]:
        return
    predicate = None if tenant is None else sql.SQL("WHERE tenant_id = {}").format(
        sql.Literal(tenant))
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(schema, name)))
    conn.execute(sql.SQL(
        "CREATE INDEX {} ON {} USING hnsw (embedding public.vector_cosine_ops)"
        " WITH (m = {}, ef_construction = {}) {}"
    ).format(sql.Identifier(name), sql.Identifier(schema, table), sql.Literal(m),
             sql.Literal(ef_construction), predicate or sql.SQL("")))


def _index_settled(schema: str, table: str, name: str, m: int, ef_construction: int,
                   tenant: str | None, follow_parameters: bool = True) -> Check:
    """The index exists, valid, HNSW on `table`, of the right shape (partial for a tenant or
    whole) and, with `follow_parameters`, with exactly these m/ef_construction."""
    options = [f"m={m}", f"ef_construction={ef_construction}"]
    return Check(sql.SQL("""
        EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid
                JOIN pg_am am ON am.oid = c.relam
                WHERE n.nspname = %s AND c.relname = %s AND i.indisvalid
                  AND am.amname = 'hnsw' AND t.relname = %s AND (i.indpred IS NULL) = %s
                  AND (NOT %s OR (coalesce(c.reloptions, '{{}}') @> %s::text[]
                                  AND coalesce(c.reloptions, '{{}}') <@ %s::text[])))"""),
        [schema, name, table, tenant is None, follow_parameters, options, options])


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
    """NOLOGIN, then cut the role's sessions; False when it is missing or not the operator's."""
    if not _is_managed(conn, role):
        return False
    _ensure_role(conn, role, {"rolcanlogin": False})
    # NOLOGIN is committed before the sessions are cut, so none can reconnect in between.
    _terminate_sessions(conn, role)
    return True


def retain_tenant(conn: Conn, tenant: str) -> str:
    """deletionPolicy Retain: lock the tenant out, keep its data; describe where it remains."""
    role, schema = bridge_role(tenant), bridge_schema(tenant)
    _rename_legacy(conn, tenant)
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
    """deletionPolicy Delete: drop the tenant's schema, shared rows, partial indexes and role.

    The data goes first, each part in its own committed transaction; the role last, so that a
    role that cannot be dropped (RoleDropError, raised for the caller to retry) keeps no data.
    """
    validate_tenant_id(tenant)
    managed = _drop_bridge_data(conn, tenant)
    delete_shared_rows(conn, tenant)
    if managed:
        _drop_role(conn, bridge_role(tenant))


def drop_bridge(conn: Conn, tenant: str) -> None:
    """Drop the tenant's bridge schema with its data, then its role (idempotent).

    A role that is not the operator's (see UnmanagedRole) is left alone.
    """
    if _drop_bridge_data(conn, tenant):
        _drop_role(conn, bridge_role(tenant))


def _drop_bridge_data(conn: Conn, tenant: str) -> bool:
    """Lock the bridge role out and drop its schema; True when the role is the operator's."""
    _rename_legacy(conn, tenant)
    managed = _lock_out(conn, bridge_role(tenant))
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(bridge_schema(tenant))))
    return managed


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
                _drop_partial_indexes(conn, int(match.group(1)), tenant)
    return deleted


def _connect_to(conn: Conn, database: str) -> Conn:
    """A new autocommit connection like `conn` (same server, user, password) to `database`."""
    options = {option.keyword.decode(): option.val.decode() for option in conn.pgconn.info
               if option.val is not None}
    options["dbname"] = database
    return psycopg.connect(make_conninfo(**options), autocommit=True, connect_timeout=10)


def _drop_role(conn: Conn, role: str) -> None:
    """DROP OWNED in every database where the role owns or was granted something, then DROP
    ROLE; raise RoleDropError (with every cause) when it remains.

    A login may have reached other databases (e.g. through PUBLIC's CONNECT before bootstrap
    revoked it) and left objects there, large objects included: each would block DROP ROLE.
    """
    oid = _role_oid(conn, role)
    if oid is None:
        with conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {} WHERE role_name = %s").format(_registry()),
                         (role,))
        return
    elsewhere = fetch_rows(conn, """
        SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid
        WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = %s
          AND d.datname <> current_database() ORDER BY 1""", (oid,))
    problems: list[str] = []
    for (database,) in elsewhere:
        try:
            with _connect_to(conn, str(database)) as other:
                other.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        except psycopg.Error as exc:
            problems.append(f"DROP OWNED in database {database}: {exc}".strip())
    try:
        with conn.transaction():
            # Here too: privileges granted by hand, large objects, the CONNECT grant.
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DELETE FROM {} WHERE role_name = %s").format(_registry()),
                         (role,))
    except psycopg.Error as exc:
        problems.append(f"DROP ROLE: {exc}".strip())
        raise RoleDropError(
            f"role {role} could not be dropped (its data is already deleted; it stays NOLOGIN"
            f" and is retried): " + "; ".join(problems)) from exc
