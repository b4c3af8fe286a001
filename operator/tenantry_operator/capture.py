"""Change capture for online isolation upgrades: which rows a moving tenant changed, and when.

While a move is in flight, every source table of the tenant carries two row triggers whose
WHEN clause names the tenant: a write of any other tenant is filtered by that clause in the
executor (no function call, nothing logged), and when no move is in flight there are no
triggers at all. The trigger function records the primary key of each inserted, updated or
deleted row of the tenant in `tenantry_private.move_changes`; the move replays those keys from
the source's current state (delete the key in the target, copy what the source holds for it),
which is idempotent: a key replayed twice, or a log row consumed after a crash, changes nothing.

The function is SECURITY DEFINER, owned by the operator's admin, in the private schema that no
other role can use: tenant logins and the runtime's role cannot read, write or call it; firing
a trigger checks no privilege of the writer. Like a pool tenant's partial HNSW index, the WHEN
clause (readable in pg_trigger) names the tenant; the trigger name is opaque.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import psycopg
from psycopg import sql
from tenantry_runtime.contracts.database import (
    PRIVATE_SCHEMA,
    Conn,
    ensure_private_schema,
    fetch_rows,
    opaque_name,
    operator_lock,
    validate_tenant_id,
)

MOVES = sql.Identifier(PRIVATE_SCHEMA, "moves")
CHANGES = sql.Identifier(PRIVATE_SCHEMA, "move_changes")
_FUNCTION = "capture_change"
# A trigger is created or dropped under a lock that waits for the table's running writes (of
# every tenant) and queues new ones behind it: give up quickly and retry rather than stall them.
_LOCK_TIMEOUT = "500ms"
_LOCK_ATTEMPTS = 40

Key = tuple[tuple[str, Any], ...]


def trigger_names(tenant: str) -> tuple[str, str, str]:
    """The tenant's capture triggers: new rows (insert, update), deleted rows, and the old row
    of an update that changed its key."""
    return (opaque_name("move-new", tenant), opaque_name("move-old", tenant),
            opaque_name("move-key", tenant))


def key_columns(conn: Conn, schema: str, table: str) -> list[str]:
    """The primary key's columns but tenant_id, in key order; [] when there is none."""
    rows = fetch_rows(conn, """
        SELECT a.attname FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])
        WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary AND a.attname <> 'tenant_id'
        ORDER BY array_position(i.indkey::int2[], a.attnum)""", (schema, table))
    return [str(name) for (name,) in rows]


def _ensure_function(conn: Conn) -> None:
    exists = fetch_rows(conn, """
        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = %s AND p.proname = %s""", (PRIVATE_SCHEMA, _FUNCTION))
    if exists:
        return
    function = sql.Identifier(PRIVATE_SCHEMA, _FUNCTION)
    # TG_ARGV: 'new' or 'old' (which row to log), the source table, then its key columns.
    conn.execute(sql.SQL("""
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        DECLARE
            changed jsonb := CASE WHEN TG_ARGV[0] = 'new' THEN to_jsonb(NEW) ELSE to_jsonb(OLD) END;
        BEGIN
            INSERT INTO {changes} (tenant_id, source_table, key)
            SELECT changed ->> 'tenant_id', TG_ARGV[1],
                   coalesce(jsonb_object_agg(k, changed -> k), '{{}}')
            FROM unnest(TG_ARGV[2:]) AS k;
            RETURN NULL;
        END $$""").format(function=function, changes=CHANGES))
    conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(function))


def _with_lock_retries(conn: Conn, statement: sql.Composed) -> None:
    for attempt in range(_LOCK_ATTEMPTS):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (_LOCK_TIMEOUT,))
                conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == _LOCK_ATTEMPTS - 1:
                raise


def _has_trigger(conn: Conn, schema: str, table: str, name: str) -> bool:
    return bool(fetch_rows(conn, """
        SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND t.tgname = %s AND t.tgparentid = 0""",
        (schema, table, name)))


def start_capture(conn: Conn, tenant: str, source: str, target: str, schema: str,
                  tables: list[str]) -> bool:
    """Record the move and put the capture triggers on `schema`'s `tables` (idempotent).

    Returns whether the bulk copy is already done (a move resumed after a crash). The triggers
    are committed before this returns: a snapshot taken afterwards plus the log miss nothing.
    """
    validate_tenant_id(tenant)
    ensure_private_schema(conn)
    with conn.transaction():
        operator_lock(conn, f"capture:{PRIVATE_SCHEMA}")  # one creator of the function
        _ensure_function(conn)
        conn.execute(sql.SQL("INSERT INTO {} (tenant_id, source, target) VALUES (%s, %s, %s)"
                             " ON CONFLICT (tenant_id) DO NOTHING").format(MOVES),
                     (tenant, source, target))
        row = fetch_rows(conn, sql.SQL("SELECT source, target, bulk_done FROM {}"
                                       " WHERE tenant_id = %s").format(MOVES), (tenant,))[0]
    if (row[0], row[1]) != (source, target):  # an abandoned move elsewhere: start over
        with conn.transaction():
            conn.execute(sql.SQL("UPDATE {} SET source = %s, target = %s, bulk_done = false,"
                                 " rows_copied = 0 WHERE tenant_id = %s").format(MOVES),
                         (source, target, tenant))
        row = (source, target, False)
    function = sql.Identifier(PRIVATE_SCHEMA, _FUNCTION)
    owner = sql.Literal(tenant)  # validated; WHEN takes no parameters
    for table in tables:
        columns = key_columns(conn, schema, table)
        args = sql.SQL(", ").join([sql.Literal(table), *map(sql.Literal, columns)])
        relation = sql.Identifier(schema, table)

        def row_key(row: str, names: list[str] = columns) -> sql.Composable:
            return sql.SQL("ROW({})").format(sql.SQL(", ").join(
                sql.SQL("{}.{}").format(sql.SQL(row), sql.Identifier(c))
                for c in [*names, "tenant_id"]))

        key_changed = sql.SQL(" AND {} IS DISTINCT FROM {}").format(row_key("OLD"),
                                                                   row_key("NEW"))
        for name, events, row_ref, extra in zip(trigger_names(tenant), (
                "INSERT OR UPDATE", "DELETE", "UPDATE"), ("NEW", "OLD", "OLD"),
                (sql.SQL(""), sql.SQL(""), key_changed), strict=True):
            if _has_trigger(conn, schema, table, name):
                continue
            _with_lock_retries(conn, sql.SQL(
                "CREATE TRIGGER {name} AFTER {events} ON {relation} FOR EACH ROW"
                " WHEN ({row}.tenant_id = {owner}{extra})"
                " EXECUTE FUNCTION {function}({which}, {args})"
            ).format(name=sql.Identifier(name), events=sql.SQL(events), relation=relation,
                     row=sql.SQL(row_ref), owner=owner, extra=extra, function=function,
                     which=sql.Literal(row_ref.lower()), args=args))
    return bool(row[2])


def stop_capture(conn: Conn, tenant: str) -> None:
    """Drop the tenant's capture triggers from every table, then forget its move (idempotent)."""
    validate_tenant_id(tenant)
    names = list(trigger_names(tenant))
    rows = fetch_rows(conn, """
        SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE t.tgname = ANY (%s) AND t.tgparentid = 0""", (names,))
    for schema, table, name in rows:
        _with_lock_retries(conn, sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
            sql.Identifier(name), sql.Identifier(schema, table)))
    if not fetch_rows(conn, "SELECT to_regclass(%s)", (f"{PRIVATE_SCHEMA}.moves",))[0][0]:
        return
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(CHANGES), (tenant,))
        conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(MOVES), (tenant,))


def mark_bulk_done(conn: Conn, tenant: str, done: bool, rows: int = 0) -> None:
    conn.execute(sql.SQL("UPDATE {} SET bulk_done = %s, rows_copied = %s"
                         " WHERE tenant_id = %s").format(MOVES), (done, rows, tenant))


def bulk_rows(conn: Conn, tenant: str) -> int:
    rows = fetch_rows(conn, sql.SQL("SELECT rows_copied FROM {} WHERE tenant_id = %s").format(
        MOVES), (tenant,))
    return int(rows[0][0]) if rows else 0


def pending_changes(conn: Conn, tenant: str, limit: int | None, after: int = 0,
                    upto: int | None = None) -> tuple[list[int], dict[str, list[Key]]]:
    """Up to `limit` (None: all) logged changes with `after` < id <= `upto` (None: no bound):
    their ids in order, and each table's distinct keys."""
    rows = fetch_rows(conn, sql.SQL(
        "SELECT id, source_table, key FROM {} WHERE tenant_id = %s AND id > %s"
        " AND (%s::bigint IS NULL OR id <= %s) ORDER BY id LIMIT %s").format(CHANGES),
        (tenant, after, upto, upto, limit))
    keys: dict[str, set[Key]] = defaultdict(set)
    for _id, table, key in rows:
        keys[str(table)].add(tuple(sorted(key.items())))
    return [int(r[0]) for r in rows], {t: sorted(k, key=repr) for t, k in keys.items()}


def last_change(conn: Conn, tenant: str) -> int:
    """The highest id logged for the tenant so far (0: none)."""
    rows = fetch_rows(conn, sql.SQL("SELECT max(id) FROM {} WHERE tenant_id = %s").format(
        CHANGES), (tenant,))
    return int(rows[0][0] or 0)


def consume_changes(conn: Conn, tenant: str, ids: list[int]) -> None:
    conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND id = ANY (%s)").format(
        CHANGES), (tenant, ids))


def keys_json(keys: list[Key]) -> str:
    return json.dumps([dict(key) for key in keys])
