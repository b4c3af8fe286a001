"""The shared-database contract: tenant ids, names, migrations, tenant sessions, usage rollup."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from typing import Any, LiteralString, TypeAlias

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

__all__ = [
    "APP_ROLE",
    "BILLING_TABLES",
    "PARTITIONED_TABLES",
    "PRIVATE_SCHEMA",
    "SHARED_SCHEMA",
    "TENANT_ID_CHECK",
    "TENANT_ID_PATTERN",
    "TENANT_LOCK_WAIT",
    "TENANT_PREDICATE",
    "TENANT_SETTING",
    "Conn",
    "InvalidTenantId",
    "Migration",
    "MigrationChecksumError",
    "MigrationError",
    "bound_lock_wait",
    "bridge_role",
    "bridge_schema",
    "ensure_check_constraint",
    "ensure_partitions",
    "ensure_private_schema",
    "ensure_tenant_rls",
    "fetch_rows",
    "legacy_bridge_name",
    "load_migrations",
    "migrate",
    "migrate_lock_key",
    "opaque_name",
    "operator_lock",
    "reset_session",
    "rollup_usage",
    "set_tenant",
    "tenant_transaction",
    "validate_identifier",
    "validate_tenant_id",
]

Conn: TypeAlias = psycopg.Connection[Any]
Query: TypeAlias = LiteralString | bytes | sql.SQL | sql.Composed

# A DNS label of at most 40 characters that starts with a letter (`acme-corp`): the id is
# embedded verbatim in Kubernetes names (`tenant-<id>`) and Redis keys, which take hyphens.
# It never becomes a Postgres identifier: names of tenant objects are opaque hashes of it
# (opaque_name), so that catalogs every login can read do not list tenants, and it reaches SQL
# only as a bound parameter or a literal. No '_', '.', ':' or braces: those separate the id from
# what follows it in names and keys, so no two ids map to one name.
TENANT_ID_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
# Schema and table names we build ourselves; anything else is refused before it reaches SQL.
IDENTIFIER_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

SHARED_SCHEMA = "tenantry"
# The platform's record of what a tenant owes. A bridge tenant's login (whose password sits in a
# Secret of its namespace) may read these tables in its schema but never write them: the runtime
# meters into them with APP_ROLE, and invoices are closed with the operator's admin. Otherwise a
# tenant could delete its usage, or insert the row of a request before the runtime does (ON
# CONFLICT DO NOTHING would then keep the tenant's version) or its next invoice.
BILLING_TABLES = ("ai_usage_logs", "billing_invoices", "usage_daily")
# The operator's own bookkeeping (locks, verified copies): no role but its owner may use it, so no
# tenant login can take, hold or even name its locks.
PRIVATE_SCHEMA = "tenantry_private"
APP_ROLE = "tenantry_app"
PARTITIONED_TABLES = ("ai_conversations", "ai_usage_logs")
# The tenant of the session; NULL when unset. After a transaction that set it, RESET, DISCARD
# or set_config(NULL) the setting reads '' rather than NULL: '' means "no tenant" too, so that a
# code path that forgets to set it matches no row (and its inserts fail) instead of sharing an
# empty bucket with every other such path.
TENANT_SETTING = sql.SQL("NULLIF(current_setting('app.current_tenant', true), '')")
TENANT_PREDICATE = sql.SQL("tenant_id = {}").format(TENANT_SETTING)
# Every tenant table refuses rows whose tenant_id is not a valid tenant id ('' included).
TENANT_ID_CHECK = sql.SQL("tenant_id ~ {}").format(sql.Literal(TENANT_ID_PATTERN.pattern))
TENANT_ID_CONSTRAINT = "tenant_id_valid"

_MIGRATIONS_PACKAGE = "tenantry_runtime.contracts"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class InvalidTenantId(ValueError):
    """A tenant id that does not match TENANT_ID_PATTERN."""


class MigrationError(RuntimeError):
    """A migration could not be applied."""


class MigrationChecksumError(MigrationError):
    """An applied migration file was changed afterwards."""


def validate_tenant_id(name: str) -> str:
    """Return `name` if it is a valid tenant id, else raise InvalidTenantId."""
    if not isinstance(name, str) or not TENANT_ID_PATTERN.fullmatch(name):
        raise InvalidTenantId(
            f"invalid tenant id {name!r}: use 1 to 40 lowercase letters, digits and hyphens,"
            " starting with a letter and ending with a letter or digit (a DNS label such as"
            " 'acme-corp')"
        )
    return name


def validate_identifier(name: str) -> str:
    """Return `name` if it is a plain lowercase SQL identifier, else raise ValueError."""
    if not isinstance(name, str) or not IDENTIFIER_PATTERN.fullmatch(name):
        raise ValueError(f"invalid SQL identifier {name!r}")
    return name


def opaque_name(purpose: str, tenant: str) -> str:
    """`t_` + 32 hex digits of sha256 over a domain-separated tenant id: a per-tenant name
    that, listed in a catalog every login can read, does not say which tenant it serves.

    Unsalted, so it hides the id only from someone who cannot guess it: hashing a candidate
    id confirms it. A pure function of the id: every replica derives the same name.
    """
    digest = hashlib.sha256(f"tenantry/{purpose}/v1:{validate_tenant_id(tenant)}".encode())
    return f"t_{digest.hexdigest()[:32]}"


def legacy_bridge_name(tenant: str) -> str:
    """The schema and role name of a bridge tenant before names were opaque (renamed on the
    next reconcile)."""
    return f"tenant_{validate_tenant_id(tenant)}"


def bridge_schema(tenant: str) -> str:
    return opaque_name("bridge", tenant)


def bridge_role(tenant: str) -> str:
    return opaque_name("bridge", tenant)


def fetch_rows(
    conn: Conn, query: Query, params: Sequence[Any] | Mapping[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    """Run `query` and return tuples whatever row factory the caller's connection uses."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


# --- operator locks -----------------------------------------------------------------------------

# Row locks on a table in PRIVATE_SCHEMA instead of advisory locks: an advisory key can be taken
# by any login that can compute it, which would let a tenant stall other tenants' migrations.
_PRIVATE_TABLES: dict[str, sql.SQL] = {
    "locks": sql.SQL("name text PRIMARY KEY"),
    # Written by an isolation upgrade in the transaction that switches the registry; cleanup
    # removes only source tables listed here.
    "verified_copies": sql.SQL(
        "tenant_id text NOT NULL, source_schema text NOT NULL, source_table text NOT NULL,"
        " target text, rows bigint NOT NULL, digest text NOT NULL,"
        " verified_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (tenant_id, source_schema, source_table)"),
    # Usage export (tenantry_runtime.export): the last row a provider acknowledged, per
    # exporter and source schema; moved only after the acknowledgement.
    "usage_export_checkpoints": sql.SQL(
        "exporter text NOT NULL, source_schema text NOT NULL, export_xid xid8 NOT NULL,"
        " tenant_id text NOT NULL, request_id text NOT NULL, created_at timestamptz NOT NULL,"
        " exported bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (exporter, source_schema)"),
    # Online isolation upgrades (operator/tenantry_operator/capture.py): one row per move in
    # flight, and the keys of the rows its tenant changed since (filled by triggers).
    "moves": sql.SQL(
        "tenant_id text PRIMARY KEY, source text NOT NULL, target text NOT NULL,"
        " bulk_done boolean NOT NULL DEFAULT false, rows_copied bigint NOT NULL DEFAULT 0,"
        " started_at timestamptz NOT NULL DEFAULT now()"),
    "move_changes": sql.SQL(
        "id bigint GENERATED ALWAYS AS IDENTITY, tenant_id text NOT NULL,"
        " source_table text NOT NULL, key jsonb NOT NULL, PRIMARY KEY (tenant_id, id)"),
}
# Concurrent CREATE ... IF NOT EXISTS can still collide on the catalogs' unique indexes.
_CREATE_RACES = (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema,
                 psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject)


def ensure_private_schema(conn: Conn) -> None:
    """Create PRIVATE_SCHEMA and its tables if missing; safe against concurrent callers."""
    for _ in range(5):
        present = fetch_rows(conn, """
            SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = %s AND c.relname = ANY(%s)""",
            (PRIVATE_SCHEMA, list(_PRIVATE_TABLES)))[0][0]
        if present == len(_PRIVATE_TABLES):
            return
        try:
            with conn.transaction():  # a savepoint inside the caller's transaction
                _create_private_schema(conn)
            return
        except _CREATE_RACES:
            continue  # another session created it first: look again
    raise RuntimeError(f"could not create schema {PRIVATE_SCHEMA!r}")


def _create_private_schema(conn: Conn) -> None:
    schema = sql.Identifier(PRIVATE_SCHEMA)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema))
    for table, columns in _PRIVATE_TABLES.items():
        name = sql.Identifier(PRIVATE_SCHEMA, table)
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(name, columns))
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(name))


# How long the operator waits for a lock on a table that a tenant's login may hold too (a bridge
# or silo tenant's tables: an idle transaction that read one holds it as long as the tenant
# likes). Past it the statement fails with LockNotAvailable and the step is retried, instead of
# a worker (and, under the role registry's lock, every other tenant's changes) waiting on it.
TENANT_LOCK_WAIT = "5s"


def bound_lock_wait(conn: Conn) -> None:
    """Until the caller's transaction ends, wait at most TENANT_LOCK_WAIT for any lock."""
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (TENANT_LOCK_WAIT,))


def operator_lock(conn: Conn, key: str) -> None:
    """Hold the lock named `key` exclusively until the caller's transaction ends.

    Call inside a transaction. Only the schema's owner (the operator's admin, or a superuser)
    can take it: tenant logins have no privilege on PRIVATE_SCHEMA.
    """
    if conn.info.transaction_status == TransactionStatus.IDLE:
        raise RuntimeError("operator_lock() lasts until commit: call it inside a transaction")
    ensure_private_schema(conn)
    locks = sql.Identifier(PRIVATE_SCHEMA, "locks")
    # First make sure the row exists (this waits for a concurrent inserter to commit), then lock
    # it in a new statement, whose snapshot sees that row.
    conn.execute(sql.SQL("INSERT INTO {} (name) VALUES (%s) ON CONFLICT DO NOTHING").format(
        locks), (key,))
    conn.execute(sql.SQL("SELECT 1 FROM {} WHERE name = %s FOR UPDATE").format(locks), (key,))


# --- tenant sessions --------------------------------------------------------------------------


def set_tenant(conn: Conn, tenant_id: str) -> None:
    """Set app.current_tenant for the current transaction only (RLS policies read it).

    On an autocommit connection outside a transaction block it lasts one statement: use
    tenant_transaction() instead.
    """
    validate_tenant_id(tenant_id)
    # is_local=true: the setting dies with the transaction, so a pooled connection never carries
    # one tenant's identity into the next request.
    conn.execute("SELECT set_config('app.current_tenant', %s, true)", (tenant_id,))


@contextmanager
def tenant_transaction(conn: Conn, tenant_id: str) -> Iterator[Conn]:
    """A transaction in which RLS sees only `tenant_id`.

    Inside an already open transaction this is a savepoint, and the setting then lasts until
    the outer transaction ends.
    """
    validate_tenant_id(tenant_id)
    with conn.transaction():
        set_tenant(conn, tenant_id)
        yield conn


def reset_session(conn: Conn) -> None:
    """Return a pooled connection to a clean session: the `reset` hook for a connection pool.

    DISCARD ALL drops session-level settings (a tenant set with is_local=false, SET ROLE),
    temporary tables, prepared statements and advisory locks, so the next borrower starts with
    no tenant. Use it as `psycopg_pool.ConnectionPool(dsn, reset=reset_session,
    kwargs={"prepare_threshold": None})`: psycopg's cache of server-side prepared statements
    does not survive DISCARD ALL in every path (executemany failed with "prepared statement
    does not exist"), so pooled connections do without them.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        # The pool only resets idle connections; anything else is a bug worth stopping on.
        raise RuntimeError("reset_session() needs an idle connection")
    autocommit = conn.autocommit
    conn.autocommit = True  # DISCARD ALL cannot run inside a transaction block
    try:
        conn.execute("DISCARD ALL")
    finally:
        conn.autocommit = autocommit


# --- migrations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    body: bytes

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def load_migrations() -> list[Migration]:
    """The versioned SQL files shipped with this package, in version order."""
    folder = resources.files(_MIGRATIONS_PACKAGE) / "migrations"
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files share version {version}")
        found[version] = Migration(version, match.group(2), entry.read_bytes())
    return [found[v] for v in sorted(found)]


def _ensure_vector_extension(conn: Conn) -> None:
    if fetch_rows(conn, "SELECT 1 FROM pg_extension WHERE extname = 'vector'"):
        return
    with conn.transaction():
        # One key for the database: two schemas migrating at once would otherwise race on the
        # extension's unique name.
        operator_lock(conn, "extension:vector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public")


def _applied_checksums(conn: Conn, schema: str) -> dict[int, str]:
    rows = fetch_rows(conn, sql.SQL("SELECT version, checksum FROM {}.schema_migrations").format(
        sql.Identifier(schema)))
    return {int(version): str(checksum) for version, checksum in rows}


def _check_checksum(schema: str, migration: Migration, applied: dict[int, str]) -> None:
    recorded = applied.get(migration.version)
    if recorded is not None and recorded != migration.checksum:
        raise MigrationChecksumError(
            f"migration {migration.version:04d}_{migration.name} was changed after it was applied"
            f" to schema {schema!r} (recorded {recorded[:12]}, file {migration.checksum[:12]});"
            " add a new migration instead of editing an applied one"
        )


def migrate_lock_key(schema: str) -> str:
    """The operator lock that migrate() holds on `schema`: held, no table appears or goes."""
    return f"migrate:{validate_identifier(schema)}"


def migrate(conn: Conn, schema: str) -> list[int]:
    """Apply the pending migrations to `schema` (created if missing); return versions applied.

    Each migration runs in its own transaction under an operator lock keyed on the schema, so
    concurrent callers (two operator replicas) apply every version exactly once.
    """
    validate_identifier(schema)
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise MigrationError("migrate() commits each migration: call it outside a transaction")
    migrations = load_migrations()
    lock_key = migrate_lock_key(schema)
    target = sql.Identifier(schema)
    ensure_private_schema(conn)  # the locks below live there
    _ensure_vector_extension(conn)
    # Settled (every version recorded): read only, no lock (taking it is itself a write).
    if _relation_exists(conn, schema, "schema_migrations"):
        applied = _applied_checksums(conn, schema)
        if all(m.version in applied for m in migrations):
            for migration in migrations:
                _check_checksum(schema, migration, applied)
            return []
    with conn.transaction():
        operator_lock(conn, lock_key)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(target))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())").format(target))
        applied = _applied_checksums(conn, schema)
    # Refuse to build on an edited history before touching anything.
    for migration in migrations:
        _check_checksum(schema, migration, applied)

    done: list[int] = []
    for migration in migrations:
        if migration.version in applied:
            continue
        with conn.transaction():
            operator_lock(conn, lock_key)
            # Another replica may have applied it while we waited for the lock.
            applied = _applied_checksums(conn, schema)
            if migration.version in applied:
                _check_checksum(schema, migration, applied)
                continue
            conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(target))
            try:
                conn.execute(migration.body)
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed on schema"
                    f" {schema!r}: {exc}") from exc
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version, name, checksum)"
                        " VALUES (%s, %s, %s)").format(target),
                (migration.version, migration.name, migration.checksum))
            done.append(migration.version)
    return done


# --- row-level security and partitions --------------------------------------------------------


def ensure_tenant_rls(conn: Conn, schema: str, table: str) -> None:
    """Enable and force RLS on `schema.table` with the `tenant_isolation` policy, and refuse
    tenant ids that are not valid ones (the TENANT_ID_CONSTRAINT check); idempotent."""
    qualified = sql.Identifier(validate_identifier(schema), validate_identifier(table))
    rows = fetch_rows(conn, """
        SELECT c.relrowsecurity, c.relforcerowsecurity,
               EXISTS (SELECT 1 FROM pg_policy p
                       WHERE p.polrelid = c.oid AND p.polname = 'tenant_isolation')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s""", (schema, table))
    if not rows:
        raise ValueError(f"table {schema}.{table} does not exist")
    enabled, forced, has_policy = rows[0]
    # ALTER TABLE takes an exclusive lock: only issue it when something is missing.
    if not enabled:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(qualified))
    if not forced:
        conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(qualified))
    if not has_policy:
        conn.execute(sql.SQL(
            "CREATE POLICY tenant_isolation ON {} USING ({}) WITH CHECK ({})"
        ).format(qualified, TENANT_PREDICATE, TENANT_PREDICATE))
    # A table created before tenant ids took hyphens carries the older pattern: replaced.
    ensure_check_constraint(conn, schema, table, TENANT_ID_CONSTRAINT, TENANT_ID_CHECK,
                            must_contain=TENANT_ID_PATTERN.pattern)


def ensure_check_constraint(conn: Conn, schema: str, table: str, name: str,
                            check: sql.Composable, must_contain: str | None = None) -> None:
    """Add the CHECK constraint `name` to `schema.table` unless it is there.

    `must_contain`, when given, is a text the definition (pg_get_constraintdef) must contain:
    a constraint of that name without it is replaced. Rows that already violate it are kept (the
    constraint is then added NOT VALID: enforced for every new or updated row), so adding a
    guard never fails a reconcile nor deletes data.
    """
    qualified = sql.Identifier(validate_identifier(schema), validate_identifier(table))
    rows = fetch_rows(conn, """
        SELECT pg_get_constraintdef(co.oid) FROM pg_constraint co
        JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND co.conname = %s""",
        (schema, table, validate_identifier(name)))
    if rows:
        if must_contain is None or must_contain in str(rows[0][0]):
            return
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            qualified, sql.Identifier(name)))
    add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
        qualified, sql.Identifier(name), check)
    try:
        with conn.transaction():
            conn.execute(add)
    except psycopg.errors.CheckViolation:
        conn.execute(add + sql.SQL(" NOT VALID"))


def _month_start(day: date, months_later: int) -> datetime:
    index = day.year * 12 + day.month - 1 + months_later
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _relation_exists(conn: Conn, schema: str, name: str) -> bool:
    return bool(fetch_rows(conn, """
        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s""", (schema, name)))


def ensure_partitions(
    conn: Conn, schema: str, months_ahead: int = 3, today: date | None = None
) -> list[str]:
    """Create the monthly partitions of this month and the next `months_ahead`; return new names.

    Rows already sitting in the DEFAULT partition for a new month are moved into it in the same
    transaction (Postgres refuses to create the partition otherwise). Moving needs a connection
    that sees every tenant's rows: a superuser or a BYPASSRLS role, as the operator's admin is.
    """
    validate_identifier(schema)
    if months_ahead < 0:
        raise ValueError("months_ahead must be >= 0")
    first = today or datetime.now(UTC).date()
    ensure_private_schema(conn)  # the lock below lives there
    created: list[str] = []
    for parent in PARTITIONED_TABLES:
        if not _relation_exists(conn, schema, parent):
            raise ValueError(f"{schema}.{parent} does not exist: run migrate() first")
        for offset in range(months_ahead + 1):
            lower, upper = _month_start(first, offset), _month_start(first, offset + 1)
            name = f"{parent}_{lower.year:04d}_{lower.month:02d}"
            if _relation_exists(conn, schema, name):
                continue  # read only: the lock is taken only to create
            with conn.transaction():
                operator_lock(conn, f"partitions:{schema}")
                bound_lock_wait(conn)  # the parent's lock: a tenant's login may hold it
                if _relation_exists(conn, schema, name):
                    continue
                _create_partition(conn, schema, parent, name, lower, upper)
            created.append(name)
    return created


def _create_partition(
    conn: Conn, schema: str, parent: str, name: str, lower: datetime, upper: datetime
) -> None:
    parent_id = sql.Identifier(schema, parent)
    default_id = sql.Identifier(schema, f"{parent}_default")
    bounds = {"lower": lower, "upper": upper}
    stray = fetch_rows(conn, sql.SQL(
        "SELECT 1 FROM {} WHERE created_at >= %(lower)s AND created_at < %(upper)s LIMIT 1"
    ).format(default_id), bounds)
    if stray:
        conn.execute(sql.SQL("CREATE TEMP TABLE tenantry_moving (LIKE {}) ON COMMIT DROP").format(
            default_id))
        conn.execute(sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE created_at >= %(lower)s"
            " AND created_at < %(upper)s RETURNING *)"
            " INSERT INTO tenantry_moving SELECT * FROM moved"
        ).format(default_id), bounds)
    conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(schema, name), parent_id,
        sql.Literal(lower.isoformat()), sql.Literal(upper.isoformat())))
    ensure_tenant_rls(conn, schema, name)
    if stray:
        conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM tenantry_moving").format(parent_id))
        # ON COMMIT DROP is not enough inside a caller's transaction: the next month reuses it.
        conn.execute("DROP TABLE tenantry_moving")


# --- usage ------------------------------------------------------------------------------------


def rollup_usage(conn: Conn, schema: str, day: date, tenant: str | None = None) -> int:
    """(Re)compute `schema.usage_daily` for `day` (UTC) from ai_usage_logs; return rows written.

    Idempotent: running it again yields the same numbers; a (tenant, model) pair that has no
    logs left for the day is removed. Without `tenant` it covers every tenant, which needs a
    superuser or BYPASSRLS connection; with `tenant` it runs as that tenant (RLS-filtered).
    """
    validate_identifier(schema)
    if tenant is not None:
        validate_tenant_id(tenant)
    lower = datetime.combine(day, time(), tzinfo=UTC)
    params = {"day": day, "lower": lower, "upper": lower + timedelta(days=1), "tenant": tenant}
    only_tenant = sql.SQL("AND tenant_id = %(tenant)s" if tenant else "")
    target, logs = sql.Identifier(schema, "usage_daily"), sql.Identifier(schema, "ai_usage_logs")
    upsert = sql.SQL("""
        INSERT INTO {target} AS d (tenant_id, day, model, requests, input_tokens, output_tokens,
                                   cache_creation_input_tokens, cache_read_input_tokens,
                                   cost, updated_at)
        SELECT tenant_id, %(day)s, model, count(*), sum(input_tokens), sum(output_tokens),
               sum(cache_creation_input_tokens), sum(cache_read_input_tokens),
               coalesce(sum(cost), 0), now()
        FROM {logs}
        WHERE created_at >= %(lower)s AND created_at < %(upper)s {only_tenant}
        GROUP BY tenant_id, model
        ON CONFLICT (tenant_id, day, model) DO UPDATE SET
            requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            cache_creation_input_tokens = EXCLUDED.cache_creation_input_tokens,
            cache_read_input_tokens = EXCLUDED.cache_read_input_tokens,
            cost = EXCLUDED.cost,
            updated_at = EXCLUDED.updated_at
    """).format(target=target, logs=logs, only_tenant=only_tenant)
    prune = sql.SQL("""
        DELETE FROM {target} AS d
        WHERE d.day = %(day)s {only_tenant}
          AND NOT EXISTS (SELECT 1 FROM {logs} AS l
                          WHERE l.tenant_id = d.tenant_id AND l.model = d.model
                            AND l.created_at >= %(lower)s AND l.created_at < %(upper)s)
    """).format(target=target, logs=logs, only_tenant=only_tenant)

    def run() -> int:
        with conn.cursor() as cur:
            cur.execute(upsert, params)
            written = cur.rowcount
            cur.execute(prune, params)
        return written

    if tenant is None:
        with conn.transaction():
            return run()
    with tenant_transaction(conn, tenant):
        return run()
