"""Usage events from the tenants' Redis streams into `ai_usage_logs`, in batches.

Each tenant's `usage` stream is read through a consumer group, so replicas share the work and
an entry stays pending until its batch is committed: a writer that dies re-reads its own
pending entries, and entries another replica left pending for `claim_idle_seconds` are
claimed. Rows are inserted with ON CONFLICT DO NOTHING on (tenant_id, request_id, created_at),
created_at being the request's start, so a re-read batch is never counted twice. Writes go
through `contracts.tenant_locks.write_transaction`; on TenantMoved the batch stays pending
and is retried with the config the store holds by then.

This slice writes tenants whose rows live in the shared database (`database.kind ==
"shared"`); bridge and silo tenants keep their events in Redis until their credentials are
wired (see docs/runtime.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg import sql
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from .contracts.database import validate_identifier
from .contracts.redis_keys import TenantKeys
from .contracts.runtime_config import TenantRuntimeConfig
from .contracts.tenant_locks import TenantMoved, write_transaction
from .store import TenantStore

log = logging.getLogger(__name__)

GROUP = "usage-writer"
Entry = tuple[bytes, dict[bytes, bytes]]
UsageRow = tuple[str, str, datetime, str, int, int, int, int]
_COLUMNS = ("tenant_id", "request_id", "created_at", "model", "input_tokens", "output_tokens",
            "cache_creation_input_tokens", "cache_read_input_tokens")


def usage_stream(tenant: str) -> str:
    return TenantKeys(tenant).prefix + "usage"


def usage_rows(tenant: str, entries: Sequence[Entry]) -> tuple[list[UsageRow], list[bytes]]:
    """Pure: the rows of well-formed entries of `tenant`, and the ids of the others."""
    rows: list[UsageRow] = []
    bad: list[bytes] = []
    for entry_id, fields in entries:
        try:
            event = json.loads(fields[b"event"])
            if event["tenant"] != tenant or event["request_id"] != fields[b"request_id"].decode():
                raise ValueError("event does not belong to this stream")
            rows.append((tenant, str(event["request_id"]), datetime.fromisoformat(event["at"]),
                         str(event["model"]), int(event["input_tokens"]),
                         int(event["output_tokens"]), int(event["cache_creation_input_tokens"]),
                         int(event["cache_read_input_tokens"])))
        except (KeyError, ValueError, TypeError):
            bad.append(entry_id)
    return rows, bad


def insert_usage(conn: psycopg.Connection[Any], config: TenantRuntimeConfig,
                 rows: Sequence[UsageRow]) -> None:
    """One transaction through the write gate; idempotent on the request."""
    schema = validate_identifier(config.database.schema_name)
    statement = sql.SQL(
        "INSERT INTO {}.ai_usage_logs ({}) VALUES ({}) "
        "ON CONFLICT (tenant_id, request_id, created_at) DO NOTHING").format(
        sql.Identifier(schema), sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)))
    with write_transaction(conn, config.tenant, config.isolation), conn.cursor() as cur:
        cur.executemany(statement, rows)


@dataclass
class UsageWriter:
    redis: Redis
    dsn: str
    store: TenantStore
    consumer: str
    batch: int = 500
    claim_idle_seconds: float = 30.0
    failures: Counter[str] = field(default_factory=Counter)
    _groups: set[str] = field(default_factory=set)

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._groups.add(stream)

    async def _next_entries(self, stream: str) -> list[Entry]:
        """Abandoned entries of other consumers, then our own pending, then new ones."""
        claimed = await self.redis.xautoclaim(
            stream, GROUP, self.consumer, int(self.claim_idle_seconds * 1000), "0-0",
            count=self.batch)
        entries: dict[bytes, dict[bytes, bytes]] = dict(claimed[1])
        for start in ("0", ">"):
            if len(entries) >= self.batch:
                break
            # RESP2 shape: [(stream, [(id, fields), ...])]
            read = cast(list[tuple[bytes, list[Entry]]], await self.redis.xreadgroup(
                GROUP, self.consumer, {stream: start}, count=self.batch - len(entries)) or [])
            for _, found in read:
                entries.update(found)
        return list(entries.items())

    async def drain(self, tenant: str) -> int:
        """Write the tenant's pending and new events; rows written (conflicts included)."""
        written = 0
        stream = usage_stream(tenant)
        await self._ensure_group(stream)
        while True:
            record = self.store.get(tenant)
            if record is None or record.config.database.kind != "shared":
                return written
            entries = await self._next_entries(stream)
            if not entries:
                return written
            rows, bad = usage_rows(tenant, entries)
            for entry_id in bad:
                self.failures["usage_event_invalid"] += 1
                log.error("usage event %s of %s is malformed; dropped: %r", entry_id, tenant,
                          dict(entries)[entry_id])
            if rows:
                await asyncio.to_thread(self._write, record.config, rows)
            ids = [entry_id for entry_id, _ in entries]
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
                await pipe.execute()
            written += len(rows)
            if len(entries) < self.batch:
                return written

    def _write(self, config: TenantRuntimeConfig, rows: Sequence[UsageRow]) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            insert_usage(conn, config, rows)

    async def run(self, interval: float) -> None:
        while True:
            for tenant in self.store.tenants():
                try:
                    await self.drain(tenant)
                except TenantMoved as moved:
                    # The store reloads the config; the batch stays pending until then.
                    self.failures["usage_tenant_moved"] += 1
                    log.info("usage of %s waits for its new location: %s", tenant, moved)
                except (RedisError, psycopg.Error, OSError):
                    self.failures["usage_write_error"] += 1
                    log.exception("writing usage of %s failed; retrying", tenant)
            await asyncio.sleep(interval)
