"""The lifecycle of tenants' limits in a real redis-server: written, versioned, removed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from tenantry_devenv.services import Redis as RedisServer
from tenantry_operator.model import EffectiveSpec, PlanSpec, TenantSpec, effective_spec
from tenantry_operator.quotas import delete_tenant_keys, read_limits, write_limits
from tenantry_runtime.contracts.database import InvalidTenantId
from tenantry_runtime.contracts.redis_keys import TenantKeys

PLAN = PlanSpec.model_validate({"model": "m", "budgets": {"dailyTokens": 1000,
                                                           "monthlyTokens": 9000}})


def spec(name: str, generation: int, **ai: object) -> EffectiveSpec:
    tenant = TenantSpec.from_body({"planRef": {"name": "p"}, "ai": ai})
    return effective_spec(name, "uid", generation, tenant, PLAN)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    await redis.flushdb()
    yield redis
    await redis.aclose()


async def test_limits_are_written_under_the_tenant_prefix(client: Redis) -> None:
    assert await write_limits(client, spec("acme", 1, budgets={"dailyTokens": 500}), 1)
    limits = await read_limits(client, "acme")
    assert limits["daily_tokens"] == "500" and limits["monthly_tokens"] == "9000"
    assert limits["revision"] == "1" and limits["suspended"] == "0"
    assert await client.exists("tenantry:v1:{acme}:limits") == 1


async def test_a_stale_revision_never_overwrites_a_newer_one(client: Redis) -> None:
    await write_limits(client, spec("acme", 5, budgets={"dailyTokens": 700}), 5)
    assert not await write_limits(client, spec("acme", 4, budgets={"dailyTokens": 1}), 4)
    assert (await read_limits(client, "acme"))["daily_tokens"] == "700"
    assert await write_limits(client, spec("acme", 6, budgets={"dailyTokens": 800}), 6)
    assert (await read_limits(client, "acme"))["daily_tokens"] == "800"


async def test_deleting_one_tenant_leaves_a_prefix_sharing_neighbour_alone(
    client: Redis,
) -> None:
    now = datetime.now(UTC)
    for name in ("acme", "acme2"):
        await write_limits(client, spec(name, 1), 1)
        keys = TenantKeys(name)
        await client.set(keys.tokens_day(now), 42)
        await client.set(keys.requests_minute(now), 3)
    assert await delete_tenant_keys(client, "acme") == 3
    assert await delete_tenant_keys(client, "acme") == 0  # idempotent
    assert sorted(k.decode() for k in await client.keys("*")) == sorted([
        TenantKeys("acme2").limits, TenantKeys("acme2").tokens_day(now),
        TenantKeys("acme2").requests_minute(now)])


@pytest.mark.parametrize("hostile", ["acme}:*", "*", "a b", "ACME", "x" * 41, ""])
def test_hostile_tenant_ids_cannot_form_keys(hostile: str) -> None:
    with pytest.raises(InvalidTenantId):
        TenantKeys(hostile)


def test_known_keys_cover_every_key_the_runtime_uses() -> None:
    """Deletion removes known names (no SCAN): each key the runtime's scripts touch is one,
    at any moment of the month, settled markers aside (they expire on their own)."""
    from datetime import timedelta

    from tenantry_runtime.limits import limit_keys

    start = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    for at in (start, start + timedelta(minutes=2), datetime(2026, 3, 1, tzinfo=UTC)):
        known = set(TenantKeys("acme").known_keys(at))
        used = limit_keys("acme", at).settle(at.timestamp())[:-1]  # the settled bucket aside
        assert set(used) <= known, set(used) - known
        keys = TenantKeys("acme")
        assert {keys.requests_minute(at), keys.tokens_minute(at)} <= known
        # Yesterday's and last month's counters may not have expired yet.
        assert keys.tokens_day(at - timedelta(days=1)) in known
        assert keys.tokens_month(at.replace(day=1) - timedelta(days=1)) in known
    assert all(k.startswith(TenantKeys("acme").prefix) for k in known)


async def test_the_same_limits_again_write_nothing(client: Redis) -> None:
    """A settled reconcile leaves Redis alone: no DEL/HSET when the hash already matches."""
    assert await write_limits(client, spec("acme", 3), 3)
    before = (await client.info("persistence"))["rdb_changes_since_last_save"]
    assert await write_limits(client, spec("acme", 3), 3)  # Redis holds them: True
    assert (await client.info("persistence"))["rdb_changes_since_last_save"] == before
    assert await write_limits(client, spec("acme", 3, budgets={"dailyTokens": 1}), 3)
    assert (await client.info("persistence"))["rdb_changes_since_last_save"] > before
    assert (await read_limits(client, "acme"))["daily_tokens"] == "1"
