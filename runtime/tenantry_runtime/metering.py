"""Usage events from the tenants' Redis streams into `ai_usage_logs`, in batches.

Each tenant's `usage` stream is read through a consumer group, so replicas share the work and
an entry stays pending until its batch is committed: a writer that dies re-reads its own
pending entries, and entries another replica left pending for `claim_idle_seconds` are
claimed. Rows are inserted with ON CONFLICT DO NOTHING on (tenant_id, request_id, created_at),
created_at being the request's start, so a re-read batch is never counted twice. Writes go
through `contracts.tenant_locks.write_transaction`; on TenantMoved the batch stays pending
and is retried with the config the store holds by then.

Where the rows go: a pool tenant's and a bridge tenant's into the shared database (`dsn`, the
runtime's login; a bridge tenant's into its own schema, where its login may read usage but not
write it: `BILLING_TABLES`); a silo tenant's into its database through its login DSN from the
tenant record (`database_dsn`), while the gate is held on the shared database, whose registry
row is the gate of every tenant. A silo tenant without a DSN keeps its events in Redis
(counted, logged once) until its record carries one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import psycopg
import psycopg.errors
from psycopg import sql
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from .contracts.database import tenant_transaction, validate_identifier
from .contracts.redis_keys import TenantKeys
from .contracts.runtime_config import TenantRuntimeConfig
from .contracts.tenant_locks import TenantMoved, write_transaction
from .limits import Usage
from .store import TenantRecord, TenantStore

log = logging.getLogger(__name__)

GROUP = "usage-writer"
Entry = tuple[bytes, dict[bytes, bytes]]
UsageRow = tuple[str, str, datetime, str, int, int, int, int, Decimal | None, str | None,
                 str | None, float | None, int | None, str | None, str | None, bool | None]
_COLUMNS = ("tenant_id", "request_id", "created_at", "model", "input_tokens", "output_tokens",
            "cache_creation_input_tokens", "cache_read_input_tokens", "cost", "currency",
            "price_version", "latency_ms", "status", "endpoint", "api_key_name", "stream")


def usage_stream(tenant: str) -> str:
    return TenantKeys(tenant).prefix + "usage"


# The event's token counts, in the table's column order.
TOKEN_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))
# What ai_usage_logs.cost (numeric(20, 10)) holds.
MAX_COST = Decimal(10) ** 10


def _optional(event: dict[str, Any], name: str, kind: Any) -> Any:
    """The event's `name` as `kind`, None when absent (events written before the field)."""
    value = event.get(name)
    return None if value is None else kind(value)


def usage_rows(tenant: str, entries: Sequence[Entry]) -> tuple[list[UsageRow], list[bytes]]:
    """Pure: the rows of well-formed entries of `tenant`, and the ids of the others."""
    rows: list[UsageRow] = []
    bad: list[bytes] = []
    for entry_id, fields in entries:
        try:
            event = json.loads(fields[b"event"])
            if event["tenant"] != tenant or event["request_id"] != fields[b"request_id"].decode():
                raise ValueError("event does not belong to this stream")
            # Exact: the cost travels as a decimal string and becomes numeric, never a float.
            cost = _optional(event, "cost", Decimal)
            if cost is not None and (not cost.is_finite() or not 0 <= cost < MAX_COST):
                raise ValueError(f"cost {cost}")
            tokens = [int(event[name]) for name in TOKEN_FIELDS]
            if not all(0 <= count < 2**63 for count in tokens):
                # Postgres would refuse the batch (CHECK >= 0, bigint) on every retry, and
                # hold the tenant's later events behind it.
                raise ValueError(f"token counts {tokens}")
            rows.append((tenant, str(event["request_id"]), datetime.fromisoformat(event["at"]),
                         str(event["model"]), *tokens, cost,
                         _optional(event, "currency", str), _optional(event, "price_version", str),
                         _optional(event, "latency_ms", float), _optional(event, "status", int),
                         _optional(event, "endpoint", str), _optional(event, "key", str),
                         _optional(event, "stream", bool)))
        except (KeyError, ValueError, TypeError, InvalidOperation):
            bad.append(entry_id)
    return rows, bad


def _insert(conn: psycopg.Connection[Any], schema: str, rows: Sequence[UsageRow]) -> None:
    # No conflict target: naming one needs SELECT on its columns, and the runtime may only
    # INSERT into a bridge tenant's usage. The table's one unique key is its primary key
    # (tenant_id, request_id, created_at), so a re-read batch still lands once.
    statement = sql.SQL(
        "INSERT INTO {}.ai_usage_logs ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
        sql.Identifier(validate_identifier(schema)),
        sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)))
    with conn.cursor() as cur:
        cur.executemany(statement, rows)


def insert_usage(conn: psycopg.Connection[Any], config: TenantRuntimeConfig,
                 rows: Sequence[UsageRow],
                 data_conn: psycopg.Connection[Any] | None = None) -> None:
    """Idempotent on the request, under the tenant's write gate on the shared database `conn`.

    Without `data_conn` the rows go into `conn` in the gate's transaction (pool and bridge
    tenants); with it (silo) they are committed there, as the tenant, while the gate is held,
    so an isolation upgrade waits for the batch and a stale location raises TenantMoved.
    """
    with write_transaction(conn, config.tenant, config.isolation):
        if data_conn is None:
            _insert(conn, config.database.schema_name, rows)
        else:
            with tenant_transaction(data_conn, config.tenant):
                _insert(data_conn, config.database.schema_name, rows)


def _in_own_database(record: TenantRecord) -> bool:
    """A silo tenant: its usage lives in its own database, reached through its login."""
    return record.config.database.kind == "dedicated"


@dataclass
class UsageWriter:
    redis: Redis
    dsn: str
    store: TenantStore
    consumer: str
    batch: int = 500
    claim_idle_seconds: float = 30.0
    # How long a batch waits for a gate held by an isolation change before it is retried in
    # the next round: the writer serves every tenant, one tenant's move must not stall all.
    gate_wait_seconds: float = 2.0
    # The same bound in a silo's own database, whose admin is the tenant's (it may lock its
    # usage table or run it slow): the insert gives up there too, and the batch is retried.
    silo_statement_seconds: float = 10.0
    failures: Counter[str] = field(default_factory=Counter)
    _groups: set[str] = field(default_factory=set)
    _waiting: set[str] = field(default_factory=set)
    _unchecked: set[str] = field(default_factory=set)  # tenants whose pending are not read yet

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
        # Reading the pending history is a write for Redis even when empty (replicated, and it
        # dirties the dataset each second per tenant): only when XPENDING (a read) finds some.
        pending = int((await self.redis.xpending(stream, GROUP))["pending"])
        for start in ("0", ">") if pending else (">",):
            if len(entries) >= self.batch:
                break
            # RESP2 shape: [(stream, [(id, fields), ...])]
            read = cast(list[tuple[bytes, list[Entry]]], await self.redis.xreadgroup(
                GROUP, self.consumer, {stream: start}, count=self.batch - len(entries)) or [])
            for _, found in read:
                entries.update(found)
        return list(entries.items())

    async def drain(self, tenant: str) -> int:
        """Write the tenant's pending and new events; rows written (conflicts included).

        The recovery path (a crash, a failed batch, another replica's abandoned entries);
        new events of every tenant come through `read_new` in one blocking read."""
        written = 0
        stream = usage_stream(tenant)
        await self._ensure_group(stream)
        while True:
            record = self.store.get(tenant)
            if record is None or not self._writable(record):
                return written
            entries = await self._next_entries(stream)
            if not entries:
                return written
            written += await self._write_entries(record, stream, entries)
            if len(entries) < self.batch:
                return written

    async def _write_entries(self, record: TenantRecord, stream: str,
                             entries: Sequence[Entry]) -> int:
        """One batch: rows committed, then the entries acknowledged and deleted."""
        tenant = record.config.tenant
        rows, bad = usage_rows(tenant, entries)
        for entry_id in bad:
            self.failures["usage_event_invalid"] += 1
            log.error("usage event %s of %s is malformed; dropped: %r", entry_id, tenant,
                      dict(entries)[entry_id])
        if rows:
            await asyncio.to_thread(self._write, record, rows)
        ids = [entry_id for entry_id, _ in entries]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()
        return len(rows)

    async def read_new(self, block_seconds: float) -> dict[str, list[Entry]]:
        """New events of every writable tenant in ONE XREADGROUP over all their streams,
        blocking up to `block_seconds` while there are none: by tenant.

        Single-node Redis (as `resp.py`): a Redis Cluster refuses keys of several slots in one
        command, and each tenant's stream has its own slot (its hash tag)."""
        streams = await self._streams()
        if not streams:
            await asyncio.sleep(block_seconds)
            return {}
        read = cast(list[tuple[bytes, list[Entry]]], await self.redis.xreadgroup(
            GROUP, self.consumer, dict.fromkeys(streams, ">"), count=self.batch,
            block=max(1, int(block_seconds * 1000))) or [])
        return {streams[name.decode()]: found for name, found in read if found}

    async def _streams(self) -> dict[str, str]:
        """The usage stream of every writable tenant (its group created once): by name."""
        streams: dict[str, str] = {}
        for tenant in self.store.tenants():
            record = self.store.get(tenant)
            if record is None or not self._writable(record):
                continue
            stream = usage_stream(tenant)
            if stream not in self._groups:
                # First seen by this writer (its start, a new or reloaded tenant): entries a
                # previous run of this consumer left pending are read back at once.
                self._unchecked.add(tenant)
                await self._ensure_group(stream)
            streams[stream] = tenant
        return streams

    async def _pending_tenants(self) -> list[str]:
        """Tenants whose stream has entries pending for any consumer: one pipelined XPENDING
        (a read) per stream, in one round trip."""
        tenants = [t for t in self.store.tenants() if usage_stream(t) in self._groups]
        if not tenants:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.xpending(usage_stream(tenant), GROUP)
            summaries = await pipe.execute(raise_on_error=False)
        return [t for t, summary in zip(tenants, summaries, strict=True)
                if isinstance(summary, dict) and int(summary["pending"])]

    def _writable(self, record: TenantRecord) -> bool:
        """Pool and bridge tenants always; silo ones once their record has a DSN."""
        tenant = record.config.tenant
        if not _in_own_database(record) or record.database_dsn is not None:
            self._waiting.discard(tenant)
            return True
        self.failures["usage_no_database_credentials"] += 1
        if tenant not in self._waiting:
            self._waiting.add(tenant)
            log.warning("usage of %s (%s) stays in Redis: its record has no database_dsn",
                        tenant, record.config.isolation)
        return False

    def _write(self, record: TenantRecord, rows: Sequence[UsageRow]) -> None:
        lock_wait = sql.SQL("SET lock_timeout = {}").format(
            sql.Literal(f"{int(self.gate_wait_seconds * 1000)}ms"))
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(lock_wait)
            if not _in_own_database(record) or record.database_dsn is None:
                insert_usage(conn, record.config, rows)
                return
            with psycopg.connect(record.database_dsn.get_secret_value(), autocommit=True,
                                 connect_timeout=5) as data_conn:
                data_conn.execute(lock_wait)
                data_conn.execute(sql.SQL("SET statement_timeout = {}").format(
                    sql.Literal(f"{int(self.silo_statement_seconds * 1000)}ms")))
                insert_usage(conn, record.config, rows, data_conn)

    async def _guarded(self, tenant: str, work: Awaitable[object]) -> bool:
        """Run one tenant's batch; False when its entries stay pending (retried later)."""
        try:
            await work
            return True
        except psycopg.errors.LockNotAvailable:
            self.failures["usage_gate_busy"] += 1
            log.info("usage of %s waits: its write gate (an isolation change) or its silo's"
                     " usage table is held", tenant)
        except TenantMoved as moved:
            # The store reloads the config; the batch stays pending until then.
            self.failures["usage_tenant_moved"] += 1
            log.info("usage of %s waits for its new location: %s", tenant, moved)
        except (RedisError, psycopg.Error, OSError):
            # Postgres or Redis away: the events stay pending in Redis and are
            # written when it answers again (nothing is acknowledged before commit).
            self.failures["usage_write_error"] += 1
            log.exception("writing usage of %s failed; retrying", tenant)
        return False

    async def run(self, interval: float) -> None:
        """Block on every tenant's stream at once; recover pending entries now and then.

        New events: one XREADGROUP over all streams, blocking up to `interval` (nothing is
        polled per tenant; an idle writer sends one command per interval, which writes
        nothing). Pending entries (a batch that failed, a crash, a replica gone): the tenants
        whose batch failed, and those first seen (start, new tenant), are drained again each
        `interval`; every `claim_idle_seconds` / 2 (and at start) one pipelined XPENDING
        finds the streams with pending entries of any consumer, which are drained through
        XAUTOCLAIM and our own pending history.
        """
        retry: set[str] = set()
        next_sweep = 0.0
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        while True:
            # A cancellation that lands in redis-py's blocking read can be lost there (seen: a
            # cancelled writer kept reading, and its owner waited forever): stop when one was
            # asked for, whatever the read made of it.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + max(interval, self.claim_idle_seconds / 2)
                    await self._streams()  # the groups of tenants new since the last sweep
                    retry.update(await self._pending_tenants())
                retry |= self._unchecked
                self._unchecked.clear()
                for tenant in sorted(retry):
                    if await self._guarded(tenant, self.drain(tenant)):
                        retry.discard(tenant)
                started = loop.time()
                for tenant, entries in (await self.read_new(interval)).items():
                    record = self.store.get(tenant)
                    if record is None:
                        continue
                    # A failed batch stays pending (drained again); a full one may have more
                    # behind it, which the next read returns at once.
                    if not await self._guarded(tenant, self._write_entries(
                            record, usage_stream(tenant), entries)):
                        retry.add(tenant)
                if retry and loop.time() - started < interval:
                    await asyncio.sleep(interval - (loop.time() - started))
            except (RedisError, OSError):
                self.failures["usage_write_error"] += 1
                log.exception("reading usage streams failed; retrying")
                next_sweep = 0.0
                await asyncio.sleep(interval)
