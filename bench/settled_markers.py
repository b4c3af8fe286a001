"""Redis memory of settle.lua's idempotency markers, per settled request, side by side.

Runs the real settle.lua on a scratch redis-server (tenantry_devenv) for N requests of one
tenant at several request rates, once with a marker key per request (the format before the
buckets, still accepted from old spool lines) and once with the bucket hashes of today, and
prints `used_memory` growth per request. Usage events are trimmed away so only markers count.

    .venv/bin/python bench/settled_markers.py [--requests 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis
from tenantry_devenv.services import start_redis
from tenantry_runtime.limits import (
    SETTLE,
    SETTLED_BUCKET_SECONDS,
    SETTLED_MARKER_TTL_SECONDS,
    LimitKeys,
    limit_keys,
)
from tenantry_runtime.resp import PipelinedRedis

TENANT = "acme-corp"
START = 1_795_000_000  # a unix second: the buckets' clock is simulated, nothing is waited


def settle_call(keys: LimitKeys, request_id: str, at: float, per_request_key: bool
                ) -> tuple[list[str], list[str | int]]:
    args: list[str | int] = [request_id, 0, 86400, 86400, "{}"]
    if per_request_key:
        return ([*keys.admit(), keys.usage_stream, f"{keys.prefix}settled:{request_id}"],
                [*args, SETTLED_MARKER_TTL_SECONDS])
    return ([*keys.settle(at)], [*args, SETTLED_MARKER_TTL_SECONDS + SETTLED_BUCKET_SECONDS,
                                 "bucket"])


async def bytes_per_request(url: str, requests: int, rate: float, per_request_key: bool) -> float:
    admin = Redis.from_url(url)
    redis = PipelinedRedis(url, timeout=30)
    try:
        await admin.flushall()
        keys = limit_keys(TENANT, datetime.now(UTC))
        before = int((await admin.info("memory"))["used_memory"])
        chunk = 500
        for start in range(0, requests, chunk):
            calls = [settle_call(keys, f"req_{secrets.token_hex(12)}", START + i / rate,
                                 per_request_key) for i in range(start, min(requests,
                                                                             start + chunk))]
            await asyncio.gather(*(redis.run_script(SETTLE, k, a) for k, a in calls))
            await admin.delete(keys.usage_stream)
        after = int((await admin.info("memory"))["used_memory"])
        return (after - before) / requests
    finally:
        await redis.aclose()
        await admin.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = start_redis(Path(workdir) / "redis")
        try:
            print(f"{options.requests} settled requests of one tenant; used_memory growth"
                  f" per request (bucket width {SETTLED_BUCKET_SECONDS} s)")
            print(f"{'requests/s':>11} {'key per request':>16} {'buckets':>8} {'ratio':>6}")
            for rate in (1, 10, 100, 250, 1000):
                old = await bytes_per_request(server.url, options.requests, rate, True)
                new = await bytes_per_request(server.url, options.requests, rate, False)
                print(f"{rate:>11} {old:>14.1f} B {new:>6.1f} B {old / new:>5.1f}x")
            day = 100 * 86400
            old = await bytes_per_request(server.url, options.requests, 100, True)
            new = await bytes_per_request(server.url, options.requests, 100, False)
            print(f"one tenant at 100 requests/s for the 24 h marker lifetime: "
                  f"{old * day / 1e9:.2f} GB -> {new * day / 1e9:.2f} GB")
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
