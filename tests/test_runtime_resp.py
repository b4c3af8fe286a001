"""The runtime's pipelined Redis client against the real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis
from tenantry_devenv.processes import free_port
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.resp import (
    Address,
    PipelinedRedis,
    RedisUnavailable,
    ReplyError,
    Script,
    encode_command,
    encode_script_call,
    parse_reply,
)

pytestmark = pytest.mark.timeout(60)


def test_encode_command() -> None:
    assert encode_command(["SET", "k", 10, b"\x00v"]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n10\r\n$2\r\n\x00v\r\n")


def test_a_script_call_is_encoded_as_the_command_it_stands_for() -> None:
    keys, args = ["{t:a}:x", "{t:a}:y"], ["req_1", 42, b"\x00"]
    for _ in range(2):  # the second time from the cached head
        assert encode_script_call("ab" * 20, keys, args) == encode_command(
            ["EVALSHA", "ab" * 20, 2, *keys, *args])
    assert encode_script_call("ab" * 20, keys, ["other"]) == encode_command(
        ["EVALSHA", "ab" * 20, 2, *keys, "other"])


def test_replies_parse_whole_or_wait_for_their_rest() -> None:
    replies = (b":42\r\n$3\r\nabc\r\n$-1\r\n*3\r\n:1\r\n*-1\r\n$0\r\n\r\n+OK\r\n"
               b"-NOSCRIPT no such script\r\n*0\r\n")
    expected = [42, b"abc", None, [1, None, b""], b"OK", "error", []]
    parsed, at = [], 0
    while at < len(replies):
        reply, at = parse_reply(replies, at)
        parsed.append("error" if isinstance(reply, ReplyError) else reply)
    assert parsed == expected
    # Cut anywhere, a reply is either whole or not yet there.
    for cut in range(len(replies)):
        at, count = 0, 0
        while True:
            _, end = parse_reply(replies[:cut], at)
            if end < 0:
                break
            at, count = end, count + 1
        assert count < len(expected)


def test_address_from_url() -> None:
    assert Address.from_url("redis://127.0.0.1:6380/2") == Address(
        "127.0.0.1", 6380, 2, None, None, False)
    assert Address.from_url("rediss://user:p%40ss@cache:6390") == Address(
        "cache", 6390, 0, "user", "p@ss", True)
    with pytest.raises(ValueError, match="scheme"):
        Address.from_url("unix:///tmp/redis.sock")


async def test_many_concurrent_commands_each_get_their_own_reply(
        pipelined_redis: PipelinedRedis) -> None:
    client = pipelined_redis
    replies = await asyncio.gather(*(client.execute("ECHO", f"n{i}") for i in range(2000)))
    assert replies == [f"n{i}".encode() for i in range(2000)]
    assert await client.execute("DEL", "resp:missing") == 0
    assert await client.execute("GET", "resp:missing") is None
    assert await client.execute("PING") == b"PONG"


async def test_scripts_load_themselves_and_errors_leave_the_connection_usable(
        redis_server: RedisServer, pipelined_redis: PipelinedRedis) -> None:
    client = pipelined_redis
    script = Script("return {tonumber(ARGV[1]) + 1, KEYS[1]}")
    redis.Redis.from_url(redis_server.url).script_flush()
    assert await client.run_script(script, ["{t}:k"], [41]) == [42, b"{t}:k"]
    assert await client.run_script(script, ["{t}:k"], [1]) == [2, b"{t}:k"]
    with pytest.raises(ReplyError, match="ERR"):
        await client.run_script(Script("return redis.call('NOPE')"), [], [])
    assert await client.execute("PING") == b"PONG"


async def test_a_lost_connection_fails_fast_and_the_next_call_reconnects(
        redis_server: RedisServer, pipelined_redis: PipelinedRedis) -> None:
    client = pipelined_redis
    client_id = await client.execute("CLIENT", "ID")
    redis.Redis.from_url(redis_server.url).client_kill_filter(_id=client_id)
    await asyncio.sleep(0.1)
    assert await client.execute("PING") == b"PONG"
    assert await client.execute("CLIENT", "ID") != client_id


async def test_no_reply_in_time_is_unavailable_and_later_calls_work(
        redis_server: RedisServer) -> None:
    client = PipelinedRedis(redis_server.url, timeout=0.2)
    try:
        with pytest.raises(RedisUnavailable, match="in time"):
            await client.execute("BLPOP", "resp:never", 2)
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_nothing_listening_is_unavailable() -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    with pytest.raises(RedisUnavailable, match="connecting"):
        await client.execute("PING")
