"""Raise a tenant's isolation in place: copy, verify, switch, clean up; nothing is lost.

The tenant's writers are held (an exclusive advisory lock in the shared database, see
`tenantry_runtime.contracts.tenant_locks`) from the start of the copy to the switch, so the
copy is complete by construction and the writers resume against the new location. The
shared `tenants` row is the record of where the data lives; it flips in the same moment, so
a crash before the switch retries the whole copy, and a crash after it only finishes cleanup.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from tenantry_runtime.contracts.database import (
    SHARED_SCHEMA,
    Conn,
    bridge_schema,
    fetch_rows,
    set_tenant,
    validate_tenant_id,
)
from tenantry_runtime.contracts.tenant_locks import hold_writes

from . import database
from .conditions import now_rfc3339
from .model import Isolation
from .steps import StepContext

# Tables copied on a move, in dependency order; the embeddings table is added per tenant.
DATA_TABLES = ("documents", "ai_conversations", "ai_usage_logs", "usage_daily")


class VerificationFailed(RuntimeError):
    """The copy does not match the source; the switch does not happen."""


@dataclass(frozen=True)
class TablePair:
    source: tuple[str, str]
    target: tuple[str, str]


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


def table_pairs(tenant: str, source: Isolation, dimensions: int | None) -> list[TablePair]:
    """Pure: which source table is copied into which target table for a move from `source`."""
    src_schema = SHARED_SCHEMA if source is Isolation.POOL else bridge_schema(tenant)
    dst_schema = bridge_schema(tenant)
    pairs = [TablePair((src_schema, t), (dst_schema, t)) for t in DATA_TABLES]
    if dimensions is not None:
        src_table = (database.shared_embeddings_table(dimensions) if source is Isolation.POOL
                     else database.SCHEMA_EMBEDDINGS)
        pairs.append(TablePair((src_schema, src_table), (dst_schema, database.SCHEMA_EMBEDDINGS)))
    return pairs


def _exists(conn: Conn, schema: str, table: str) -> bool:
    return bool(fetch_rows(conn, "SELECT to_regclass(%s) IS NOT NULL",
                           (f'"{schema}"."{table}"',))[0][0])


def fingerprint(conn: Conn, schema: str, table: str, tenant: str) -> tuple[int, str]:
    """(row count, checksum) of the tenant's rows; the same rows give the same pair anywhere."""
    query = sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM "
        "(SELECT md5(t::text) AS h FROM {} t WHERE tenant_id = %s) rows"
    ).format(sql.Identifier(schema, table))
    count, digest = fetch_rows(conn, query, (tenant,))[0]
    return int(count), str(digest)


def copy_table(src: Conn, dst: Conn, pair: TablePair, tenant: str) -> int:
    """Replace the tenant's rows in the target with the source's (binary COPY, streamed)."""
    dst.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
        sql.Identifier(*pair.target)), (tenant,))
    # COPY takes no bind parameters; the tenant id is validated, and quoted as a literal.
    copy_out = sql.SQL("COPY (SELECT * FROM {} WHERE tenant_id = {}) TO STDOUT (FORMAT BINARY)"
                       ).format(sql.Identifier(*pair.source), sql.Literal(tenant))
    copy_in = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(sql.Identifier(*pair.target))
    with src.cursor().copy(copy_out) as out, dst.cursor() as cur:
        with cur.copy(copy_in) as into:
            for chunk in out:
                into.write(chunk)
        return cur.rowcount


async def report(ctx: StepContext, **fields: Any) -> None:
    """Patch migration progress into the Tenant's status now, not only at the end."""
    migration = {**ctx.status_updates.get("migration", {}), **fields}
    ctx.status_updates["migration"] = migration
    await ctx.kube.patch_tenant_status(ctx.spec.name, {"migration": migration})


def move_data(shared_dsn: str, target_dsn: str, tenant: str, source: Isolation,
              target: Isolation, dimensions: int | None, progress: list[int]) -> None:
    """Copy under the write gate, verify every table, then flip the registry row."""
    with psycopg.connect(shared_dsn, autocommit=True) as shared, \
            psycopg.connect(target_dsn, autocommit=True) as dst:
        src = shared  # pool and bridge data both live in the shared database
        pairs = [p for p in table_pairs(tenant, source, dimensions) if _exists(src, *p.source)]
        with shared.transaction():
            hold_writes(shared, tenant)
            with dst.transaction():
                set_tenant(dst, tenant)
                set_tenant(src, tenant)
                for pair in pairs:
                    progress.append(copy_table(src, dst, pair, tenant))
                for pair in pairs:
                    want, got = fingerprint(src, *pair.source, tenant), fingerprint(
                        dst, *pair.target, tenant)
                    if want != got:
                        raise VerificationFailed(
                            f"{'.'.join(pair.target)}: {got[0]} rows/{got[1][:8]} after copy, "
                            f"source has {want[0]}/{want[1][:8]}")
            # The copy is committed; flip the record while writers are still held.
            database.ensure_pool_tenant(shared, tenant, target.value)


def _count_rows(conn: Conn, tenant: str, source: Isolation, dimensions: int | None) -> int:
    total = 0
    with conn.transaction():
        set_tenant(conn, tenant)
        for pair in table_pairs(tenant, source, dimensions):
            if _exists(conn, *pair.source):
                total += int(fetch_rows(conn, sql.SQL(
                    "SELECT count(*) FROM {} WHERE tenant_id = %s").format(
                    sql.Identifier(*pair.source)), (tenant,))[0][0])
    return total


async def run_upgrade(ctx: StepContext, source: Isolation, shared_dsn: str, target_dsn: str,
                      password: str) -> None:
    spec = ctx.spec
    dims = spec.rag.embedding_dimensions if spec.rag.enabled else None
    total = await database.in_database(shared_dsn,
                                       lambda c: _count_rows(c, spec.name, source, dims))
    await report(ctx, **{"from": source.value, "to": spec.isolation.value, "step": "Copying",
                         "rowsCopied": 0, "rowsTotal": total, "startedAt": now_rfc3339()})

    def prepare(conn: Conn) -> None:  # the target schema, role and collection exist first
        database.ensure_bridge_tenant(conn, spec.name, password)
        if dims is not None:
            database.ensure_collection(conn, spec.name, "schema", dims, spec.rag.hnsw.m,
                                       spec.rag.hnsw.ef_construction)

    await database.in_database(target_dsn, prepare)
    progress: list[int] = []
    await asyncio.to_thread(move_data, shared_dsn, target_dsn, spec.name, source, spec.isolation,
                            dims, progress)
    await report(ctx, step="CleaningUp", rowsCopied=sum(progress))
    await finish_cleanup(ctx, shared_dsn)


def _cleanup(conn: Conn, tenant: str, source: str, target: Isolation) -> None:
    if current_isolation(conn, tenant) is not target:  # never before the switch
        raise VerificationFailed(f"refusing cleanup of {tenant}: the switch did not happen")
    if source == Isolation.POOL.value:
        database.delete_shared_rows(conn, tenant, keep_registry=True)
    else:
        database.drop_bridge(conn, tenant)


async def finish_cleanup(ctx: StepContext, shared_dsn: str) -> None:
    """Remove the old copy once the registry says the data moved (idempotent, crash-safe)."""
    migration = ctx.status_updates.get("migration") or ctx.status.get("migration") or {}
    if migration.get("step") not in ("Copying", "CleaningUp"):
        return
    await database.in_database(shared_dsn, lambda c: _cleanup(
        c, ctx.spec.name, migration["from"], ctx.spec.isolation))
    ctx.status_updates["migration"] = migration
    await report(ctx, step="Done", finishedAt=now_rfc3339())
