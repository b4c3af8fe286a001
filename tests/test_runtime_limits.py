"""The admission and settlement scripts against the real redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from runtime_helpers import write_limits
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.limits import Limiter, Settlement, Usage, Verdict, limit_keys
from tenantry_runtime.resp import PipelinedRedis

pytestmark = pytest.mark.timeout(120)
RESERVE = 1_000


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """redis-py, to look at what the scripts wrote."""
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def pipelined(redis_server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    """The runtime's own client, that the scripts run over."""
    redis = PipelinedRedis(redis_server.url, timeout=5)
    yield redis
    await redis.aclose()


async def spent_today(redis: Redis, tenant: str) -> int:
    return int(await redis.get(limit_keys(tenant, datetime.now(UTC)).day) or 0)


async def admit_and_settle(limiter: Limiter, tenant: str, charged: int) -> Verdict:
    now = datetime.now(UTC)
    keys = limit_keys(tenant, now)
    request_id = uuid.uuid4().hex
    verdict, _ = await limiter.admit(keys, request_id, RESERVE, now)
    if verdict is Verdict.ADMITTED:
        await asyncio.sleep(0.01)  # the upstream call: holds overlap
        await limiter.settle(
            Settlement.of(keys, request_id, Usage(input_tokens=charged), {"r": request_id}))
    return verdict


async def test_200_parallel_requests_never_spend_more_than_a_budget_of_50(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limbudget50", daily_tokens=50 * RESERVE)
    limiter = Limiter(pipelined, hold_seconds=60)
    verdicts = await asyncio.gather(
        *(admit_and_settle(limiter, "limbudget50", RESERVE) for _ in range(200)))
    assert verdicts.count(Verdict.ADMITTED) == 50
    assert set(verdicts) == {Verdict.ADMITTED, Verdict.DAILY_BUDGET}
    assert await spent_today(client, "limbudget50") == 50 * RESERVE
    # Nothing stays held after settlement.
    keys = limit_keys("limbudget50", datetime.now(UTC))
    assert int(await client.get(keys.held_total) or 0) == 0
    assert await client.zcard(keys.holds) == 0


async def test_with_overage_the_budget_is_exceeded_by_at_most_one_reservation(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limoverage", daily_tokens=50 * RESERVE + 500,
                 overage_allowed=1)
    limiter = Limiter(pipelined, hold_seconds=60)
    await asyncio.gather(*(admit_and_settle(limiter, "limoverage", RESERVE) for _ in range(200)))
    spent = await spent_today(client, "limoverage")
    assert 50 * RESERVE + 500 < spent <= 51 * RESERVE + 500


async def test_settlement_charges_real_usage_and_frees_the_rest_of_the_hold(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limsettles", daily_tokens=3 * RESERVE)
    limiter = Limiter(pipelined, hold_seconds=60)
    # Each request reserves 1,000 and uses 100: admitted while spent + 1,000 <= 3,000.
    verdicts = [await admit_and_settle(limiter, "limsettles", RESERVE // 10) for _ in range(32)]
    assert verdicts.count(Verdict.ADMITTED) == 21
    assert await spent_today(client, "limsettles") == 2_100


async def test_a_hold_of_a_runtime_that_died_expires_on_its_own(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limleak", daily_tokens=RESERVE)
    limiter = Limiter(pipelined, hold_seconds=1)
    now = datetime.now(UTC)
    keys = limit_keys("limleak", now)
    assert (await limiter.admit(keys, "dies", RESERVE, now))[0] is Verdict.ADMITTED
    # Never settled. Meanwhile the budget is held, and the refusal says "soon", not "tomorrow".
    verdict, retry_ms = await limiter.admit(keys, "waits", RESERVE, now)
    assert (verdict, retry_ms) == (Verdict.DAILY_BUDGET, 1000)
    await asyncio.sleep(1.1)
    assert (await limiter.admit(keys, "later", RESERVE, now))[0] is Verdict.ADMITTED
    assert int(await client.get(keys.held_total) or 0) == RESERVE


async def test_an_exhausted_budget_retries_after_the_day_ends(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limspent", daily_tokens=RESERVE)
    limiter = Limiter(pipelined, hold_seconds=60)
    assert await admit_and_settle(limiter, "limspent", RESERVE) is Verdict.ADMITTED
    now = datetime.now(UTC)
    verdict, retry_ms = await limiter.admit(limit_keys("limspent", now), "next", RESERVE, now)
    assert verdict is Verdict.DAILY_BUDGET
    midnight = (86400 - (now.hour * 3600 + now.minute * 60 + now.second)) * 1000
    assert midnight - 2000 <= retry_ms <= midnight + 1000


async def test_monthly_budget_refuses_when_the_daily_one_would_not(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limmonthly", monthly_tokens=RESERVE)
    limiter = Limiter(pipelined, hold_seconds=60)
    assert await admit_and_settle(limiter, "limmonthly", RESERVE) is Verdict.ADMITTED
    assert await admit_and_settle(limiter, "limmonthly", RESERVE) is Verdict.MONTHLY_BUDGET


async def test_requests_per_minute_allow_a_burst_then_refuse_with_the_wait(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limrpm", requests_per_minute=5)
    limiter = Limiter(pipelined, hold_seconds=60)
    verdicts = [await admit_and_settle(limiter, "limrpm", 1) for _ in range(6)]
    assert verdicts == [Verdict.ADMITTED] * 5 + [Verdict.REQUESTS_PER_MINUTE]
    now = datetime.now(UTC)
    _, retry_ms = await limiter.admit(limit_keys("limrpm", now), "x", 1, now)
    assert 10_000 < retry_ms <= 12_000  # one request's interval at 5/min


async def test_tokens_per_minute_count_real_usage_after_settlement(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limtpm", tokens_per_minute=2 * RESERVE)
    limiter = Limiter(pipelined, hold_seconds=60)
    # Reservations of 1,000 settle to 10 tokens: the unused 990 come back each time.
    verdicts = [await admit_and_settle(limiter, "limtpm", 10) for _ in range(20)]
    assert verdicts == [Verdict.ADMITTED] * 20
    now = datetime.now(UTC)
    keys = limit_keys("limtpm", now)
    assert (await limiter.admit(keys, "a", RESERVE, now))[0] is Verdict.ADMITTED
    assert (await limiter.admit(keys, "b", RESERVE, now))[0] is Verdict.TOKENS_PER_MINUTE
    too_big = await limiter.admit(keys, "c", 3 * RESERVE, now)
    assert too_big[0] is Verdict.RESERVATION_OVER_TOKENS_PER_MINUTE


async def test_suspended_and_unprovisioned_tenants_are_refused(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limpaused", suspended=1)
    limiter = Limiter(pipelined, hold_seconds=60)
    assert await admit_and_settle(limiter, "limpaused", 1) is Verdict.SUSPENDED
    assert await admit_and_settle(limiter, "limneverwritten", 1) is Verdict.NOT_PROVISIONED


async def test_settlement_appends_the_usage_event_to_the_tenant_stream(
        redis_server: RedisServer, client: Redis, pipelined: PipelinedRedis) -> None:
    write_limits(redis_server.url, "limevents")
    limiter = Limiter(pipelined, hold_seconds=60)
    now = datetime.now(UTC)
    keys = limit_keys("limevents", now)
    await limiter.admit(keys, "req1", RESERVE, now)
    held = await limiter.settle(Settlement.of(keys, "req1", Usage(input_tokens=3, output_tokens=4),
                                              {"request_id": "req1", "output_tokens": "4"}))
    assert held == RESERVE
    entries = await client.xrange(keys.usage_stream)
    assert [fields for _, fields in entries] == [
        {b"request_id": b"req1", b"event": b'{"request_id":"req1","output_tokens":"4"}'}]
    assert await spent_today(client, "limevents") == 7
