"""`uncancellable`: a settlement runs to its end in the request's task whatever cancels it,
against the real redis-server (the Redis client's replies, a reconnect, a thread)."""

from __future__ import annotations

import asyncio

import pytest
import redis
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.resp import PipelinedRedis
from tenantry_runtime.uncancellable import uncancellable

pytestmark = pytest.mark.timeout(60)


async def test_a_cancel_waits_for_the_end_then_is_raised(pipelined_redis: PipelinedRedis) -> None:
    """Cancelled while waiting on Redis replies (twice), on a slow Redis call and on a thread:
    every step still runs, in the cancelled task, and the cancel comes after."""
    client = pipelined_redis
    steps: list[str] = []

    async def work() -> str:
        steps.append(str(await client.execute("SET", "uncancellable:a", "1")))
        # DEBUG SLEEP: the reply comes 0.2 s later, long after the cancel below.
        await client.execute("DEBUG", "SLEEP", "0.2")
        steps.append("slept")
        steps.append(await asyncio.to_thread(lambda: "thread"))
        steps.append((await client.execute("GET", "uncancellable:a")).decode())
        return "done"

    async def request() -> str:
        return await uncancellable(work())

    task = asyncio.create_task(request())
    await asyncio.sleep(0.05)
    assert task.cancel()
    await asyncio.sleep(0.01)
    assert task.cancel()  # a second cancel is held back too
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["b'OK'", "slept", "thread", "1"]
    assert task.cancelled()


async def test_uncancelled_it_returns_the_result_and_the_task_carries_on(
        pipelined_redis: PipelinedRedis) -> None:
    client = pipelined_redis
    assert await uncancellable(client.execute("PING")) == b"PONG"

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await uncancellable(failing())
    # Outside it the client's replies are cancellable as before.
    call = asyncio.create_task(client.execute("DEBUG", "SLEEP", "0.2"))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_a_reconnect_inside_keeps_its_timeout(
        redis_server: RedisServer, pipelined_redis: PipelinedRedis) -> None:
    """Connecting (the Redis client's lock and `wait_for`) under a cancel: the connection is
    made, the command answered, then the cancel is raised."""
    client = pipelined_redis
    await client.execute("PING")
    client_id = await client.execute("CLIENT", "ID")
    redis.Redis.from_url(redis_server.url).client_kill_filter(_id=client_id)
    await asyncio.sleep(0.05)
    answers: list[object] = []

    async def work() -> None:
        try:
            answers.append(await client.execute("PING"))
        except Exception as error:  # the first call after the kill may see it
            answers.append(type(error).__name__)
            answers.append(await client.execute("PING"))

    async def request() -> None:
        await uncancellable(work())

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert answers[-1] == b"PONG"
