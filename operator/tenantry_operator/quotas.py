"""The lifecycle of a tenant's limits in Redis: written on reconcile, removed on deletion."""

from __future__ import annotations

import asyncio
import weakref
from datetime import UTC, datetime

from redis.asyncio import Redis
from tenantry_runtime.contracts.redis_keys import TenantKeys

from .model import EffectiveSpec

# Compare-and-set on the revision: an older operator (or a stale retry) never overwrites
# limits written from a newer revision of the tenant's configuration (the runtime config's
# revision, which also grows when a TenantPlan edit changes the limits). A hash that already
# holds exactly these fields is left alone (2): a settled reconcile writes nothing.
_WRITE_IF_NEWER = """
local live = redis.call('HGETALL', KEYS[1])
local fields = {}
for i = 1, #live, 2 do fields[live[i]] = live[i + 1] end
if tonumber(fields['revision'] or '-1') > tonumber(ARGV[1]) then return 0 end
local same = #live == #ARGV - 1
for i = 2, #ARGV, 2 do
  if not same then break end
  same = fields[ARGV[i]] == ARGV[i + 1]
end
if same then return 2 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
# One client (with its connection pool) per event loop and URL, instead of a connection per
# reconcile; an asyncio client cannot cross event loops.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Redis]] = (
    weakref.WeakKeyDictionary())


def shared_client(url: str) -> Redis:
    """The Redis client of this event loop for `url` (created on first use)."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(url)
    if client is None:
        client = per_loop[url] = Redis.from_url(url, socket_connect_timeout=5,
                                                socket_timeout=10)
    return client


async def close_clients() -> None:
    """Close this event loop's clients (operator shutdown)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose()


def limits_of(spec: EffectiveSpec, revision: int) -> dict[str, str]:
    """Pure: the limits hash for a tenant."""
    ai = spec.ai
    return {
        "revision": str(revision),
        "daily_tokens": str(ai.daily_tokens),
        "monthly_tokens": str(ai.monthly_tokens),
        "overage_allowed": "1" if ai.overage_allowed else "0",
        "requests_per_minute": str(ai.requests_per_minute),
        "tokens_per_minute": str(ai.tokens_per_minute),
        "max_tokens_per_request": str(ai.max_tokens_per_request),
        "suspended": "1" if spec.suspended else "0",
        # Alerted on, never enforced (the plan bills overage past it).
        "included_monthly_tokens": str(spec.billing.included_monthly_tokens),
    }


async def write_limits(redis: Redis, spec: EffectiveSpec, revision: int) -> bool:
    """Write the limits unless Redis holds a newer revision or these very limits; True when
    Redis holds them now."""
    limits = limits_of(spec, revision)
    flat = [item for pair in limits.items() for item in pair]
    key = TenantKeys(spec.name).limits
    written = await redis.eval(_WRITE_IF_NEWER, 1, key, limits["revision"], *flat)
    return bool(written)


async def read_limits(redis: Redis, tenant: str) -> dict[str, str]:
    raw = await redis.hgetall(TenantKeys(tenant).limits)
    return {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in raw.items()}


async def delete_tenant_keys(redis: Redis, tenant: str, documents: bool = False) -> int:
    """Remove the tenant's keys (limits, counters, holds, usage stream); returns how many
    were deleted. One DEL of the known names (TenantKeys.known_keys): a SCAN of the keyspace
    cost 1.2 s per deletion at 100,000 keys (bench/README.md). With `documents` (the
    documents are deleted too: deletionPolicy Delete), its entries of the shared document
    registry go first (forget_documents), so a crash in between leaves the set to retry."""
    if documents:
        await forget_documents(redis, tenant)
    return int(await redis.delete(*TenantKeys(tenant).known_keys(datetime.now(UTC))))


async def forget_documents(redis: Redis, tenant: str, batch: int = 1000) -> int:
    """Drop the tenant's document ids from the registry (contracts.redis_keys.DOCUMENT_OWNERS)
    and then its set of them; returns how many ids. Ids in batches (SSCAN, then HDEL/SREM
    pipelined): a small tenant costs two round trips, a big one never blocks Redis."""
    keys = TenantKeys(tenant)
    forgotten, cursor = 0, 0
    while True:
        cursor, found = await redis.sscan(keys.documents, cursor, count=batch)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in found]
        if ids:
            async with redis.pipeline(transaction=False) as pipe:
                for command in keys.forget_documents(ids):
                    pipe.execute_command(*command)
                await pipe.execute()
            forgotten += len(ids)
        if cursor == 0:
            break
    await redis.delete(keys.documents)
    return forgotten
