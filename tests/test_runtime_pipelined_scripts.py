"""`PipelinedRedis.run_scripts`: several scripts in one write, run in order (the settlement
and the budget alerts' check behind it), against the real redis-server."""

from __future__ import annotations

import pytest
import redis
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.resp import PipelinedRedis, ReplyError, Script, ScriptCall

pytestmark = pytest.mark.timeout(60)

CHARGE = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
READ = Script("return {tonumber(redis.call('GET', KEYS[1])), ARGV[1]}")
FAILS = Script("return redis.error_reply('ERR over the limit')")


async def test_scripts_run_in_order_and_each_keeps_its_own_reply(
        redis_server: RedisServer, pipelined_redis: PipelinedRedis) -> None:
    client = pipelined_redis
    sync = redis.Redis.from_url(redis_server.url)
    try:
        sync.delete("{pipe}:spent")
        sync.script_flush()  # both unknown to Redis: loaded on NOSCRIPT, still in order
        replies = await client.run_scripts([ScriptCall(CHARGE, ["{pipe}:spent"], [7]),
                                            ScriptCall(READ, ["{pipe}:spent"], ["seen"])])
        assert replies == [7, [7, b"seen"]]
        replies = await client.run_scripts([ScriptCall(CHARGE, ["{pipe}:spent"], [5]),
                                            ScriptCall(FAILS, [], []),
                                            ScriptCall(READ, ["{pipe}:spent"], ["after"])])
        assert replies[0] == 12 and replies[2] == [12, b"after"]
        assert isinstance(replies[1], ReplyError) and "over the limit" in str(replies[1])
        assert await client.execute("PING") == b"PONG"
    finally:
        sync.close()
