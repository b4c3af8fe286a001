"""The lifecycle of a tenant's limits in Redis: written on reconcile, removed on deletion."""

from __future__ import annotations

from redis.asyncio import Redis
from tenantry_runtime.contracts.redis_keys import TenantKeys

from .model import EffectiveSpec

# Compare-and-set on the revision: an older operator (or a stale retry) never overwrites
# limits written from a newer revision of the tenant's configuration (the runtime config's
# revision, which also grows when a TenantPlan edit changes the limits).
_WRITE_IF_NEWER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'revision') or '-1')
if current > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


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
    """Write the limits unless Redis already holds a newer revision; True when written."""
    limits = limits_of(spec, revision)
    flat = [item for pair in limits.items() for item in pair]
    key = TenantKeys(spec.name).limits
    written = await redis.eval(_WRITE_IF_NEWER, 1, key, limits["revision"], *flat)
    return bool(written)


async def read_limits(redis: Redis, tenant: str) -> dict[str, str]:
    raw = await redis.hgetall(TenantKeys(tenant).limits)
    return {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in raw.items()}


async def delete_tenant_keys(redis: Redis, tenant: str) -> int:
    """Remove every key of the tenant (limits and counters); returns how many were deleted."""
    deleted = 0
    async for key in redis.scan_iter(match=TenantKeys(tenant).pattern, count=500):
        deleted += int(await redis.delete(key))
    return deleted
