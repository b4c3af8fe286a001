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
