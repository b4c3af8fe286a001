"""The usage writer's loop (issue 7): one blocking read for every tenant's stream, no Redis
write while idle, pending entries recovered (a dead replica's, a failed batch's), against
redis-server and the embedded Postgres; events made by real requests through the SDK."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import psycopg
import pytest
from db_helpers import connect, scratch_database
from redis.asyncio import Redis
from runtime_helpers import MODEL, RuntimeServer
from tenantry_devenv.services import Postgres
from tenantry_runtime.contracts.database import migrate
from tenantry_runtime.metering import GROUP, UsageWriter, usage_stream
from tenantry_runtime.store import TenantStore

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def usage_dsn(postgres: Postgres) -> Iterator[str]:
    with scratch_database(postgres, "flow") as name, connect(postgres, name) as conn:
        migrate(conn, "tenantry")
        yield postgres.dsn(name)


class CountingRedis(Redis):
    """The real client, counting the commands it sends itself: the server's own statistics
    also count other tests' writers, which share the session's redis-server."""

    sent: Counter[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent[str(args[0]).lower()] += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        queue, sent = pipe.pipeline_execute_command, self.sent

        def counted(*args: Any, **options: Any) -> Any:  # each command the pipeline sends
            sent[str(args[0]).lower()] += 1
            return queue(*args, **options)

        pipe.pipeline_execute_command = counted  # type: ignore[method-assign]
        return pipe


@pytest.fixture
async def redis(runtime_server: RuntimeServer) -> AsyncIterator[CountingRedis]:
    client = CountingRedis.from_url(runtime_server.redis_url)
    client.sent = Counter()
    yield client
    await client.aclose()


def own_store(server: RuntimeServer, tenants: list[str]) -> TenantStore:
    """Only these tenants: the writer must not drain other tests' streams."""
    store = TenantStore()
    for tenant in tenants:
        server.add_tenant(tenant)
        store.apply(server.record(tenant))
    return store


def call(server: RuntimeServer, tenant: str) -> str:
    client = anthropic.Anthropic(base_url=server.url, api_key=server.keys[tenant]["main"],
                                 max_retries=0)
    return str(client.messages.create(model=MODEL, max_tokens=16, messages=[
        {"role": "user", "content": "metered"}])._request_id)


def logged(dsn: str, tenant: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT request_id FROM tenantry.ai_usage_logs WHERE tenant_id = %s"
            " ORDER BY request_id", (tenant,)).fetchall()]


async def eventually(what: str, check: object, within: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def stopped(task: asyncio.Task[None]) -> None:
    """Cancel the writer and wait for it, at most 10 s: one that does not stop fails with
    where it waits instead of hanging the module."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, f"the writer did not stop when cancelled: {task.get_stack()}"
    with pytest.raises(asyncio.CancelledError):
        task.result()


async def changes(redis: Redis) -> int:
    return int((await redis.info("persistence"))["rdb_changes_since_last_save"])


async def test_one_blocking_read_serves_every_tenant_and_an_idle_writer_writes_nothing(
        runtime_server: RuntimeServer, redis: CountingRedis, usage_dsn: str) -> None:
    tenants = [f"flow{i:02d}" for i in range(20)]
    store = own_store(runtime_server, tenants)
    writer = UsageWriter(redis, usage_dsn, store, "flow-a")
    task = asyncio.create_task(writer.run(0.5))
    try:
        ids = {t: await asyncio.to_thread(call, runtime_server, t) for t in tenants[:3]}
        for tenant in ids:
            await eventually(f"the row of {tenant}",
                             lambda t=tenant: logged(usage_dsn, t) == [ids[t]])  # type: ignore[misc]
        await asyncio.sleep(1.0)  # settled
        dirty, before = await changes(redis), Counter(redis.sent)
        assert before["xpending"] >= 1  # the start's sweep: pipelined commands are counted too
        await asyncio.sleep(3.0)
        delta = Counter(redis.sent)
        delta.subtract(before)
        # Counted by this writer's client (the server's statistics count other tests' writers
        # too): about one blocking read per 0.5 s for all 20 tenants (polling each tenant each
        # interval would be 120 reads); no pending check, claim or ack while nothing happens.
        assert 1 <= delta["xreadgroup"] <= 10, delta
        assert delta["xpending"] == delta["xautoclaim"] == delta["xack"] == 0, delta
        assert await changes(redis) == dirty  # an idle writer writes nothing to Redis
        # And a new event is picked up by the same blocking read.
        late = await asyncio.to_thread(call, runtime_server, tenants[-1])
        await eventually("the late row", lambda: logged(usage_dsn, tenants[-1]) == [late])
    finally:
        await stopped(task)
    for tenant in tenants:
        assert await _pending(tenant, runtime_server) == 0


async def test_entries_of_a_dead_replica_are_claimed_and_written_once(
        runtime_server: RuntimeServer, redis: Redis, usage_dsn: str) -> None:
    store = own_store(runtime_server, ["flowdead"])
    ids = sorted([await asyncio.to_thread(call, runtime_server, "flowdead") for _ in range(3)])
    dead = UsageWriter(redis, usage_dsn, store, "flow-dead")
    read = await dead.read_new(0.1)  # read, then "killed" before writing: pending for it
    assert len(read["flowdead"]) == 3
    assert await _pending("flowdead", runtime_server) == 3
    alive = UsageWriter(redis, usage_dsn, store, "flow-alive", claim_idle_seconds=0.5)
    task = asyncio.create_task(alive.run(0.2))
    try:
        await eventually("the dead replica's rows", lambda: logged(usage_dsn, "flowdead") == ids)
    finally:
        await stopped(task)
    assert await _pending("flowdead", runtime_server) == 0
    assert logged(usage_dsn, "flowdead") == ids


async def _pending(tenant: str, server: RuntimeServer) -> int:
    # A client of its own, with a deadline: the writer's blocking reads go through the
    # test's client, and this module hung once in CI after a check like this one.
    async with Redis.from_url(server.redis_url, socket_timeout=10) as own:
        return int((await own.xpending(usage_stream(tenant), GROUP))["pending"])


async def test_a_failed_batch_stays_pending_and_lands_after_the_tenant_moved_back(
        runtime_server: RuntimeServer, redis: Redis, usage_dsn: str) -> None:
    store = own_store(runtime_server, ["flowmoved"])
    with psycopg.connect(usage_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tenantry.tenants (tenant_id, isolation) VALUES (%s, 'bridge')",
                     ("flowmoved",))
    writer = UsageWriter(redis, usage_dsn, store, "flow-moved")
    task = asyncio.create_task(writer.run(0.2))
    try:
        request_id = await asyncio.to_thread(call, runtime_server, "flowmoved")
        await eventually("TenantMoved", lambda: writer.failures["usage_tenant_moved"] >= 2)
        assert logged(usage_dsn, "flowmoved") == []
        assert await _pending("flowmoved", runtime_server) == 1
        with psycopg.connect(usage_dsn, autocommit=True) as conn:
            conn.execute("UPDATE tenantry.tenants SET isolation = 'pool' WHERE tenant_id = %s",
                         ("flowmoved",))
        await eventually("the row", lambda: logged(usage_dsn, "flowmoved") == [request_id])
    finally:
        await stopped(task)
    assert await _pending("flowmoved", runtime_server) == 0


class LosingRedis(CountingRedis):
    """The real client, whose blocking read loses a cancellation, as redis-py's was seen to
    (a cancelled writer kept reading and this module hung)."""

    async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().xreadgroup(*args, **kwargs)
        except asyncio.CancelledError:
            return []


async def test_a_writer_stops_even_when_its_read_loses_the_cancellation(
        runtime_server: RuntimeServer, usage_dsn: str) -> None:
    client = LosingRedis.from_url(runtime_server.redis_url)
    client.sent = Counter()
    writer = UsageWriter(client, usage_dsn, own_store(runtime_server, ["flowlost"]), "flow-lost")
    task = asyncio.create_task(writer.run(2.0))
    try:
        await asyncio.sleep(1.0)  # the writer is in its 2 s blocking read
        assert client.sent["xreadgroup"] >= 1
        await stopped(task)
    finally:
        await client.aclose()
