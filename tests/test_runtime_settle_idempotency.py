"""settle.lua is idempotent per request id (against the real redis-server): a settlement the
spool replays after Redis ran it (the reply was lost) charges the budgets once, one event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis
from runtime_helpers import write_limits
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.limits import (
    ALREADY_SETTLED,
    SETTLED_BUCKET_SECONDS,
    SETTLED_MARKER_TTL_SECONDS,
    Limiter,
    Settlement,
    Usage,
    limit_keys,
)
from tenantry_runtime.resp import PipelinedRedis
from tenantry_runtime.spool import SettlementSpool

pytestmark = pytest.mark.timeout(120)
RESERVE = 1_000


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def limiter(redis_server: RedisServer) -> AsyncIterator[Limiter]:
    redis = PipelinedRedis(redis_server.url, timeout=5)
    yield Limiter(redis, hold_seconds=60)
    await redis.aclose()


async def admitted(limiter: Limiter, tenant: str, request_id: str) -> Settlement:
    now = datetime.now(UTC)
    keys = limit_keys(tenant, now)
    await limiter.admit(keys, request_id, RESERVE, now)
    return Settlement.of(keys, request_id, Usage(input_tokens=30, output_tokens=70),
                         {"request_id": request_id})


async def charged(client: Redis, tenant: str) -> tuple[int, int, int, int]:
    """Day and month spend, held total and usage events of the tenant."""
    keys = limit_keys(tenant, datetime.now(UTC))
    return (int(await client.get(keys.day) or 0), int(await client.get(keys.month) or 0),
            int(await client.get(keys.held_total) or 0), await client.xlen(keys.usage_stream))


async def test_a_second_settlement_of_a_request_id_changes_nothing(
        redis_server: RedisServer, client: Redis, limiter: Limiter) -> None:
    write_limits(redis_server.url, "idemtwice")
    settlement = await admitted(limiter, "idemtwice", "req_twice")
    gcra = limit_keys("idemtwice", datetime.now(UTC)).gcra_tokens
    assert await limiter.settle(settlement) == RESERVE
    after_first = (await charged(client, "idemtwice"), await client.get(gcra))
    assert after_first[0] == (100, 100, 0, 1)
    assert await limiter.settle(settlement) == ALREADY_SETTLED
    assert await charged(client, "idemtwice") == after_first[0]
    # The tokens/min state expires once idle (it may be gone by now); the second settlement
    # neither refunds into it nor recreates it.
    assert await client.get(gcra) in (None, after_first[1])
    bucket = settlement.keys[-1]
    assert bucket.startswith("tenantry:v1:{idemtwice}:")  # the tenant's hash slot
    assert await client.hkeys(bucket) == [b"req_twice"]
    assert (SETTLED_MARKER_TTL_SECONDS < await client.ttl(bucket)
            <= SETTLED_MARKER_TTL_SECONDS + SETTLED_BUCKET_SECONDS)
    # Another request of the same tenant is charged as usual.
    assert await limiter.settle(await admitted(limiter, "idemtwice", "req_other")) == RESERVE
    assert await charged(client, "idemtwice") == (200, 200, 0, 2)


async def test_a_spooled_settlement_redis_already_ran_is_replayed_without_a_charge(
        redis_server: RedisServer, client: Redis, limiter: Limiter, tmp_path: Path) -> None:
    write_limits(redis_server.url, "idemspool")
    ran = await admitted(limiter, "idemspool", "req_ran")
    lost = await admitted(limiter, "idemspool", "req_lost")
    # Redis ran `ran` but its reply was lost: the runtime spooled it; `lost` never reached Redis.
    await limiter.settle(ran)
    spool = SettlementSpool(tmp_path)
    await spool.append(ran)
    await spool.append(lost)
    assert await spool.replay(limiter) == 2
    assert spool.already_settled == 1 and spool.pending() == 0
    assert await charged(client, "idemspool") == (200, 200, 0, 2)
    events = await client.xrange(limit_keys("idemspool", datetime.now(UTC)).usage_stream)
    assert [fields[b"request_id"] for _, fields in events] == [b"req_ran", b"req_lost"]


async def test_a_spool_line_from_before_the_marker_still_settles(
        redis_server: RedisServer, client: Redis, limiter: Limiter) -> None:
    write_limits(redis_server.url, "idemold")
    settlement = await admitted(limiter, "idemold", "req_old")
    old = Settlement(settlement.keys[:9], settlement.args[:5])
    assert await limiter.settle(old) == RESERVE
    assert await charged(client, "idemold") == (100, 100, 0, 1)


async def test_a_spool_line_with_a_marker_key_per_request_stays_idempotent(
        redis_server: RedisServer, client: Redis, limiter: Limiter) -> None:
    """Lines spooled by the version before the buckets: a key per request, 6 arguments."""
    write_limits(redis_server.url, "idemkey")
    settlement = await admitted(limiter, "idemkey", "req_key")
    marker = "tenantry:v1:{idemkey}:settled:req_key"
    old = Settlement([*settlement.keys[:9], marker], [*settlement.args[:5], 60])
    assert await limiter.settle(old) == RESERVE
    assert await limiter.settle(old) == ALREADY_SETTLED
    assert await charged(client, "idemkey") == (100, 100, 0, 1)
    assert 0 < await client.ttl(marker) <= 60
