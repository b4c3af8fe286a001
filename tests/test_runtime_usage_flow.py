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
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for tenant in tenants:
        assert (await redis.xpending(usage_stream(tenant), GROUP))["pending"] == 0


async def test_entries_of_a_dead_replica_are_claimed_and_written_once(
        runtime_server: RuntimeServer, redis: Redis, usage_dsn: str) -> None:
    store = own_store(runtime_server, ["flowdead"])
    ids = sorted([await asyncio.to_thread(call, runtime_server, "flowdead") for _ in range(3)])
    dead = UsageWriter(redis, usage_dsn, store, "flow-dead")
    read = await dead.read_new(0.1)  # read, then "killed" before writing: pending for it
    assert len(read["flowdead"]) == 3
    assert (await redis.xpending(usage_stream("flowdead"), GROUP))["pending"] == 3
    alive = UsageWriter(redis, usage_dsn, store, "flow-alive", claim_idle_seconds=0.5)
    task = asyncio.create_task(alive.run(0.2))
    try:
        await eventually("the dead replica's rows", lambda: logged(usage_dsn, "flowdead") == ids)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await _pending("flowdead", redis) == 0
    assert logged(usage_dsn, "flowdead") == ids


async def _pending(tenant: str, redis: Redis) -> int:
    return int((await redis.xpending(usage_stream(tenant), GROUP))["pending"])


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
        assert await _pending("flowmoved", redis) == 1
        with psycopg.connect(usage_dsn, autocommit=True) as conn:
            conn.execute("UPDATE tenantry.tenants SET isolation = 'pool' WHERE tenant_id = %s",
                         ("flowmoved",))
        await eventually("the row", lambda: logged(usage_dsn, "flowmoved") == [request_id])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await _pending("flowmoved", redis) == 0
