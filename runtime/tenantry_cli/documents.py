"""`tenantry documents backfill`: the shared document registry made to match the databases.

The runtime registers each document it creates in Redis (`contracts.redis_keys.
DOCUMENT_OWNERS`, read by the response sanitizer on every replica). Documents created before
that, or while Redis was unreachable, are missing; ids of documents deleted while it was
unreachable linger. This command reads each tenant's document ids through its own
isolation level (the tenant's session: RLS on pool rows, its schema, its silo database) and
registers the missing ones and drops the lingering ones. Idempotent; run it once after
upgrading, and after a Redis outage. Never run by the operator's reconcile (a settled resync
writes nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import redis
from psycopg import sql
from tenantry_runtime.contracts.database import validate_identifier
from tenantry_runtime.contracts.redis_keys import TenantKeys

from .output import Progress
from .sources import UNREACHABLE, CliError, Sources

BATCH = 1000


def document_ids(conn: psycopg.Connection[Any], schema: str, tenant: str,
                 batch: int = BATCH) -> Iterator[list[str]]:
    """The tenant's document ids in batches (keyset pages by id; the connection is in the
    tenant's transaction, so RLS and the tenant filter agree)."""
    after = None
    while True:
        rows = conn.execute(sql.SQL(
            "SELECT id FROM {} WHERE tenant_id = %s AND (%s::uuid IS NULL OR id > %s::uuid)"
            " ORDER BY id LIMIT %s").format(
            sql.Identifier(validate_identifier(schema), "documents")),
            (tenant, after, after, batch)).fetchall()
        if not rows:
            return
        yield [str(row[0]) for row in rows]
        after = rows[-1][0]


def pipelined(client: redis.Redis, commands: list[list[str]]) -> list[Any]:
    """The commands in one round trip; their replies."""
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]
    return pipe.execute()


def sync_tenant(client: redis.Redis, tenant: str, batches: Iterator[list[str]]
                ) -> tuple[int, int, int]:
    """(documents, newly registered, dropped) after making the tenant's registry entries
    exactly `batches`' ids."""
    keys = TenantKeys(tenant)
    stored: set[str] = set()
    added = 0
    for ids in batches:
        stored.update(ids)
        added += int(pipelined(client, keys.register_documents(ids))[0])  # HSET: new fields
    gone = [i.decode() for i in client.sscan_iter(keys.documents, count=BATCH)
            if i.decode() not in stored]
    for at in range(0, len(gone), BATCH):
        pipelined(client, keys.forget_documents(gone[at:at + BATCH]))
    return len(stored), added, len(gone)


def redis_client(src: Sources) -> redis.Redis:
    if src.settings.redis_url is None:
        raise CliError("TENANTRY_REDIS_URL is not set", UNREACHABLE,
                       "export TENANTRY_REDIS_URL=redis://HOST:6379/0 (the runtime's Redis)")
    return redis.Redis.from_url(src.settings.redis_url.get_secret_value(),
                                socket_timeout=10, socket_connect_timeout=5)


def backfill(src: Sources, names: list[str]) -> list[dict[str, Any]]:
    """One row per tenant: documents, registered, dropped, problem (None when done)."""
    client = redis_client(src)
    rows: list[dict[str, Any]] = []
    try:
        for name in Progress("tenants", len(names)).over(names):
            view = src.tenant(name)
            row: dict[str, Any] = {"tenant": name, "documents": None, "registered": None,
                                   "dropped": None, "problem": None}
            if view.record is None:
                row["problem"] = view.problem
            else:
                try:
                    with src.tenant_connection(view) as conn:
                        counts = sync_tenant(client, name, document_ids(conn, view.schema, name))
                    row.update(zip(("documents", "registered", "dropped"), counts, strict=True))
                except (CliError, psycopg.Error) as error:
                    row["problem"] = str(error).splitlines()[0]
                except redis.RedisError as error:
                    raise CliError(f"Redis failed: {error}", UNREACHABLE,
                                   "check TENANTRY_REDIS_URL; the command can run again") from None
            rows.append(row)
    finally:
        client.close()
    return rows
