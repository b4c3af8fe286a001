"""Raise a tenant's isolation in place: copy, verify, switch, clean up; nothing is lost.

The tenant's writers are held (its registry row locked exclusively, see
`tenantry_runtime.contracts.tenant_locks`) from the start of the copy to the switch, so the copy
is complete by construction and the writers resume against the new location. The shared
`tenants` row is the record of where the data lives; it flips in the same transaction that
records which source tables were verified, so a crash before the switch retries the whole copy,
and a crash after it only finishes cleanup.

What is copied and what cleanup removes are one list, read from the catalog (`source_tables`):
every table of the source that holds the tenant's rows, whatever the spec says today (a tenant
with RAG disabled keeps its embeddings). Cleanup removes nothing without a verified copy.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from tenantry_runtime.contracts.database import (
    PRIVATE_SCHEMA,
    SHARED_SCHEMA,
    Conn,
    bridge_schema,
    ensure_private_schema,
    fetch_rows,
    migrate_lock_key,
    operator_lock,
    set_tenant,
    validate_tenant_id,
)
from tenantry_runtime.contracts.tenant_locks import hold_writes

from . import database
from .conditions import now_rfc3339
from .model import Hnsw, Isolation
from .steps import StepContext

_VERIFIED = sql.Identifier(PRIVATE_SCHEMA, "verified_copies")


class VerificationFailed(RuntimeError):
    """The copy does not match the source; the switch does not happen."""


class MoveRefused(RuntimeError):
    """The data cannot be moved without losing rows; nothing was switched."""


class RegistryMismatch(RuntimeError):
    """The registry names neither the source nor the target of the move; nothing was touched."""


class CleanupRefused(RuntimeError):
    """A source table has no verified copy; nothing was removed."""


@dataclass(frozen=True)
class TablePair:
    """A source table and where its rows go; target None: no rows there and nothing to copy."""

    source: tuple[str, str]
    target: tuple[str, str] | None


def current_isolation(conn: Conn, tenant: str) -> Isolation | None:
    """Where the tenant's data lives now, from the shared registry row (None: not yet)."""
    validate_tenant_id(tenant)
    exists = fetch_rows(conn, "SELECT to_regclass('tenantry.tenants') IS NOT NULL")[0][0]
    if not exists:
        return None
    with conn.transaction():
        set_tenant(conn, tenant)
        rows = fetch_rows(conn, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                          (tenant,))
    return Isolation(rows[0][0]) if rows else None


# --- what moves ---------------------------------------------------------------------------------


def source_schema(tenant: str, source: Isolation) -> str:
    if source is Isolation.POOL:
        return SHARED_SCHEMA
    if source is Isolation.BRIDGE:
        return bridge_schema(tenant)
    raise ValueError(f"nothing moves out of {source.value}: it is the highest isolation")


def source_tables(conn: Conn, tenant: str, source: Isolation) -> list[str]:
    """Every table of the source that cleanup removes the tenant's rows from: the move copies
    exactly these. Pool: each shared table with tenant_id but the registry; bridge: every
    table of the schema (it is dropped whole) but its migration ledger."""
    schema = source_schema(tenant, source)
    if source is Isolation.POOL:
        return [t for t in database.tenant_tables(conn, schema) if t != "tenants"]
    rows = fetch_rows(conn, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relname <> 'schema_migrations'
        ORDER BY c.relname""", (schema,))
    return [str(name) for (name,) in rows]


def target_table(source: Isolation, table: str) -> str:
    """The target's name for a source table: pool embeddings tables become `embeddings`."""
    if source is Isolation.POOL and database._is_shared_table(SHARED_SCHEMA, table):
        return database.SCHEMA_EMBEDDINGS
    return table


def _exists(conn: Conn, schema: str, table: str) -> bool:
    return bool(fetch_rows(conn, """
        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s""", (schema, table)))


def _has_rows(conn: Conn, schema: str, table: str, tenant: str) -> bool:
    return bool(fetch_rows(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE tenant_id = %s)"
                                         ).format(sql.Identifier(schema, table)), (tenant,))[0][0])


def _columns(conn: Conn, schema: str, table: str) -> list[tuple[str, str]]:
    return [(str(n), str(t)) for n, t in fetch_rows(conn, """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum""", (schema, table))]


def _embedding_dimensions(conn: Conn, schema: str, table: str) -> int | None:
    rows = fetch_rows(conn, """
        SELECT a.atttypmod FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'embedding'
          AND NOT a.attisdropped""", (schema, table))
    return int(rows[0][0]) if rows and rows[0][0] > 0 else None


def plan_move(src: Conn, dst: Conn, tenant: str, source: Isolation
              ) -> tuple[list[TablePair], list[tuple[str, str]]]:
    """Pair every source table with its target; refuse whatever would leave rows behind.

    Also returns the target tables that no source fills but that may hold stale rows of an
    earlier attempt. Run under the write gate: which tables hold the tenant's rows cannot
    change meanwhile.
    """
    schema, dst_schema = source_schema(tenant, source), bridge_schema(tenant)
    tables = source_tables(src, tenant, source)
    per_tenant = set(database.tenant_tables(src, schema))
    pairs: list[TablePair] = []
    stale: list[tuple[str, str]] = []
    by_target: dict[str, list[str]] = {}
    for table in tables:
        if table in per_tenant:
            by_target.setdefault(target_table(source, table), []).append(table)
        elif _removes_rows(src, schema, table, tenant, source):
            raise MoveRefused(f"{schema}.{table} has rows but no tenant_id column, so it cannot"
                              " be copied per tenant; move or empty it by hand first")
        else:
            pairs.append(TablePair((schema, table), None))  # empty: nothing to lose
    for target, sources in by_target.items():
        holding = [t for t in sources if _has_rows(src, schema, t, tenant)]
        if len(holding) > 1:
            raise MoveRefused(f"tenant {tenant} has rows in {', '.join(holding)} of {schema};"
                              f" they cannot all go into {dst_schema}.{target}")
        present = _exists(dst, dst_schema, target)
        if holding and not present:
            raise MoveRefused(f"{schema}.{holding[0]} holds rows of {tenant} but the target has"
                              f" no {dst_schema}.{target}")
        chosen = holding[0] if holding else None
        if chosen is not None and _columns(src, schema, chosen) != _columns(
                dst, dst_schema, target):
            raise MoveRefused(f"{schema}.{chosen} and {dst_schema}.{target} have different"
                              " columns (e.g. other embedding dimensions)")
        if chosen is None and present:
            stale.append((dst_schema, target))
        pairs += [TablePair((schema, t), (dst_schema, target) if t == chosen else None)
                  for t in sources]
    return pairs, stale


def survey_source(conn: Conn, tenant: str, source: Isolation) -> tuple[int, list[int]]:
    """(rows to move, dimensions of the embeddings tables holding some of them)."""
    schema, total, dimensions = source_schema(tenant, source), 0, []
    with conn.transaction():
        set_tenant(conn, tenant)
        per_tenant = set(database.tenant_tables(conn, schema))
        for table in source_tables(conn, tenant, source):
            if table not in per_tenant:
                continue  # plan_move refuses it with a clear message
            count = int(fetch_rows(conn, sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s")
                                   .format(sql.Identifier(schema, table)), (tenant,))[0][0])
            total += count
            dims = _embedding_dimensions(conn, schema, table)
            if count and dims is not None and target_table(
                    source, table) == database.SCHEMA_EMBEDDINGS:
                dimensions.append(dims)
    return total, dimensions


# --- copy and verify ----------------------------------------------------------------------------


def _key_order(conn: Conn, schema: str, table: str) -> sql.Composable:
    """ORDER BY the primary key (all columns without one), tenant_id left out (it is fixed),
    text in the "C" collation: the same rows come out in the same order on any server."""
    rows = fetch_rows(conn, """
        SELECT a.attname, a.attcollation <> 0 FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> 'tenant_id'
          AND (i.indexrelid IS NULL OR a.attnum = ANY (i.indkey::int2[]))
        ORDER BY coalesce(array_position(i.indkey::int2[], a.attnum), a.attnum)""",
        (schema, table))
    keys = [sql.SQL('{} COLLATE "C"').format(sql.Identifier(name)) if collatable
            else sql.Identifier(name) for name, collatable in rows]
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(keys) if keys else sql.SQL("")


def _stream(conn: Conn, schema: str, table: str, tenant: str,
            sink: Callable[[Buffer], object]) -> tuple[int, str]:
    """Send the tenant's rows as binary COPY in key order to `sink`; return (rows, sha256).

    Binary output does not depend on TimeZone, DateStyle, IntervalStyle, extra_float_digits or
    bytea_output, and the hash is computed while streaming, in constant memory.
    """
    # COPY takes no bind parameters; the tenant id is validated, and quoted as a literal.
    query = sql.SQL("COPY (SELECT * FROM {} WHERE tenant_id = {}{}) TO STDOUT (FORMAT BINARY)"
                    ).format(sql.Identifier(schema, table),
                             sql.Literal(validate_tenant_id(tenant)),
                             _key_order(conn, schema, table))
    digest = hashlib.sha256()
    with conn.cursor() as cur:
        with cur.copy(query) as out:
            for chunk in out:
                digest.update(chunk)
                sink(chunk)
        return cur.rowcount, digest.hexdigest()


def fingerprint(conn: Conn, schema: str, table: str, tenant: str) -> tuple[int, str]:
    """(row count, checksum) of the tenant's rows; the same rows give the same pair anywhere."""
    return _stream(conn, schema, table, tenant, lambda _chunk: None)


def _clear(conn: Conn, table: tuple[str, str], tenant: str) -> None:
    conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
        sql.Identifier(*table)), (tenant,))


def copy_table(src: Conn, dst: Conn, source: tuple[str, str], target: tuple[str, str],
               tenant: str) -> tuple[int, str]:
    """Replace the tenant's rows in the target with the source's; return the source's
    fingerprint, hashed from the very stream that was sent."""
    _clear(dst, target, tenant)
    copy_in = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(sql.Identifier(*target))
    with dst.cursor() as cur, cur.copy(copy_in) as into:
        return _stream(src, *source, tenant, into.write)


def _connect(dsn: str) -> Conn:
    # Binary COPY sends text in the client encoding: the same on both ends.
    return psycopg.connect(dsn, autocommit=True, client_encoding="UTF8")


def move_data(shared_dsn: str, target_dsn: str, tenant: str, source: Isolation,
              target: Isolation, progress: list[int]) -> bool:
    """Copy under the write gate, verify every table, record it, then flip the registry row.

    Returns False when the registry already names the target: another reconcile moved the data
    (and may have cleaned the source), so nothing is copied again.
    """
    with _connect(shared_dsn) as shared, _connect(target_dsn) as dst:
        src = shared  # pool and bridge data both live in the shared database
        ensure_private_schema(shared)  # the verified copies are recorded there
        with shared.transaction():
            where = hold_writes(shared, tenant)  # also scopes `shared` to the tenant
            if where == target.value:
                return False
            if where != source.value:
                raise RegistryMismatch(
                    f"tenant {tenant}: the registry says its data lives at {where}, neither"
                    f" {source.value} (the source) nor {target.value} (the target); not moving")
            with dst.transaction():
                set_tenant(dst, tenant)
                pairs, stale = plan_move(src, dst, tenant, source)
                for table in stale:  # the source has no rows for it: neither may the target
                    _clear(dst, table, tenant)
                copied: dict[TablePair, tuple[int, str]] = {}
                for pair in pairs:
                    if pair.target is not None:
                        copied[pair] = copy_table(src, dst, pair.source, pair.target, tenant)
                        progress.append(copied[pair][0])
                for pair in pairs:
                    if pair.target is None:
                        continue
                    want, got = copied[pair], fingerprint(dst, *pair.target, tenant)
                    if want != got:
                        raise VerificationFailed(
                            f"{'.'.join(pair.target)}: {got[0]} rows/{got[1][:8]} after copy, "
                            f"{'.'.join(pair.source)} has {want[0]}/{want[1][:8]}")
            # The copy is committed; record what was verified and flip the registry while
            # writers are still held.
            _record_verified(shared, tenant, target, pairs, copied)
            database.ensure_pool_tenant(shared, tenant, target.value)
    return True


def _record_verified(conn: Conn, tenant: str, target: Isolation, pairs: list[TablePair],
                     copied: dict[TablePair, tuple[int, str]]) -> None:
    for pair in pairs:
        rows, digest = copied.get(pair, (0, ""))  # not copied: verified empty under the gate
        where = f"{target.value}:{'.'.join(pair.target)}" if pair.target else None
        conn.execute(sql.SQL("""
            INSERT INTO {} (tenant_id, source_schema, source_table, target, rows, digest)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (tenant_id, source_schema, source_table) DO UPDATE SET
                target = EXCLUDED.target, rows = EXCLUDED.rows, digest = EXCLUDED.digest,
                verified_at = now()""").format(_VERIFIED),
            (tenant, *pair.source, where, rows, digest))


# --- the step -----------------------------------------------------------------------------------


async def report(ctx: StepContext, **fields: Any) -> None:
    """Patch migration progress into the Tenant's status now, not only at the end."""
    migration = {**ctx.status_updates.get("migration", {}), **fields}
    ctx.status_updates["migration"] = migration
    await ctx.kube.patch_tenant_status(ctx.spec.name, {"migration": migration})


def prepare_target(conn: Conn, tenant: str, password: str, dimensions: int | None,
                   hnsw: Hnsw) -> None:
    """The target schema, role and (when `dimensions`) collection exist before the copy."""
    database.ensure_bridge_tenant(conn, tenant, password)
    if dimensions is not None:
        database.ensure_collection(conn, tenant, "schema", dimensions, hnsw.m,
                                   hnsw.ef_construction)


async def run_upgrade(ctx: StepContext, source: Isolation, shared_dsn: str, target_dsn: str,
                      password: str) -> None:
    spec = ctx.spec
    total, held = await database.in_database(
        shared_dsn, lambda c: survey_source(c, spec.name, source))
    await report(ctx, **{"from": source.value, "to": spec.isolation.value, "step": "Copying",
                         "rowsCopied": 0, "rowsTotal": total, "startedAt": now_rfc3339()})
    # Embeddings move even when RAG is disabled now; with other dimensions than the spec's,
    # plan_move refuses with a clear message instead of dropping them.
    dims = spec.rag.embedding_dimensions if spec.rag.enabled else (held[0] if held else None)
    await database.in_database(target_dsn, lambda c: prepare_target(
        c, spec.name, password, dims, spec.rag.hnsw))
    progress: list[int] = []
    moved = await asyncio.to_thread(move_data, shared_dsn, target_dsn, spec.name, source,
                                    spec.isolation, progress)
    await report(ctx, step="CleaningUp", **({"rowsCopied": sum(progress)} if moved else {}))
    await finish_cleanup(ctx, shared_dsn)


# --- cleanup ------------------------------------------------------------------------------------


def _verified_tables(conn: Conn, tenant: str, schema: str) -> set[str]:
    rows = fetch_rows(conn, sql.SQL(
        "SELECT source_table FROM {} WHERE tenant_id = %s AND source_schema = %s").format(
        _VERIFIED), (tenant, schema))
    return {str(name) for (name,) in rows}


def _removes_rows(conn: Conn, schema: str, table: str, tenant: str, source: Isolation) -> bool:
    """Whether cleanup would remove rows from `table`: the tenant's (pool), any (bridge)."""
    if source is Isolation.POOL:
        return _has_rows(conn, schema, table, tenant)
    return bool(fetch_rows(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
        sql.Identifier(schema, table)))[0][0])


def clean_up_source(conn: Conn, tenant: str, source: Isolation, target: Isolation) -> None:
    """Remove the old copy once the registry names the target. Every source table that still
    holds rows must have a recorded verified copy, else nothing is removed (idempotent,
    crash-safe)."""
    schema = source_schema(tenant, source)
    ensure_private_schema(conn)
    forget = sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND source_schema = %s").format(
        _VERIFIED)
    with conn.transaction():
        # Held: no migration adds a table to the source while we compare and remove.
        operator_lock(conn, migrate_lock_key(schema))
        if current_isolation(conn, tenant) is not target:  # never before the switch
            raise VerificationFailed(f"refusing cleanup of {tenant}: the switch did not happen")
        verified = _verified_tables(conn, tenant, schema)
        unverified = [t for t in source_tables(conn, tenant, source)
                      if t not in verified and _removes_rows(conn, schema, t, tenant, source)]
        if unverified:
            raise CleanupRefused(
                f"refusing cleanup of {tenant}: {', '.join(unverified)} in {schema} have no"
                " verified copy in the new location; nothing was removed")
        if source is Isolation.POOL:
            database.delete_shared_rows(conn, tenant, keep_registry=True)
            conn.execute(forget, (tenant, schema))
            return
    database.drop_bridge(conn, tenant)
    conn.execute(forget, (tenant, schema))  # after the drop: a crash in between retries it


async def finish_cleanup(ctx: StepContext, shared_dsn: str) -> None:
    """Remove the old copy once the registry says the data moved (idempotent, crash-safe)."""
    migration = ctx.status_updates.get("migration") or ctx.status.get("migration") or {}
    if migration.get("step") not in ("Copying", "CleaningUp"):
        return
    await database.in_database(shared_dsn, lambda c: clean_up_source(
        c, ctx.spec.name, Isolation(migration["from"]), ctx.spec.isolation))
    ctx.status_updates["migration"] = migration
    await report(ctx, step="Done", finishedAt=now_rfc3339())
