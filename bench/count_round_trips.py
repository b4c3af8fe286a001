"""Run the operator while counting its Postgres and Redis round trips (operator_scale.py
--count-trips). Counters go to the JSON file named by TENANTRY_BENCH_TRIPS, once a second.

A round trip is one `Connection.wait` (psycopg waits once per exchange with the server: a
query, a BEGIN/COMMIT, a pipeline sync, the pool's check on borrow) or one Redis command or
pipeline sent. A checkout is one connection borrowed from a pool.
"""

from __future__ import annotations

import json
import os
import runpy
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from redis.asyncio.client import Pipeline, Redis

counts: defaultdict[str, float] = defaultdict(float)  # counts, and sums of milliseconds
_lock = threading.Lock()


def count(name: str, by: float = 1) -> None:
    with _lock:
        counts[name] += by


def patch() -> None:
    wait = psycopg.Connection.wait
    getconn = psycopg_pool.ConnectionPool.getconn
    execute = psycopg.Cursor.execute
    redis_command = Redis.execute_command
    redis_pipeline = Pipeline.execute

    def counted_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        count("pg_round_trips")
        return wait(self, *args, **kwargs)

    def counted_getconn(self: Any, *args: Any, **kwargs: Any) -> Any:
        count("pg_checkouts")
        return getconn(self, *args, **kwargs)

    def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        count("pg_statements")
        return execute(self, *args, **kwargs)

    async def counted_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        count("redis_round_trips")
        count(f"redis_{str(args[0]).lower()}" if args else "redis_?")
        return await redis_command(self, *args, **kwargs)  # type: ignore[no-untyped-call]

    async def counted_pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:
        count("redis_round_trips")
        return await redis_pipeline(self, *args, **kwargs)

    submit = ThreadPoolExecutor.submit

    def timed_submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Time waiting for a worker thread and running in it, per executor (the database
        threads are `tenantry-db`; asyncio's default executor has no name)."""
        name = "db" if (self._thread_name_prefix or "").startswith("tenantry-db") else "default"
        submitted = time.perf_counter()

        def run() -> Any:
            started = time.perf_counter()
            count(f"{name}_thread_wait_ms", (started - submitted) * 1000)
            try:
                return fn(*args, **kwargs)
            finally:
                count(f"{name}_thread_run_ms", (time.perf_counter() - started) * 1000)

        count(f"{name}_thread_calls")
        return submit(self, run)

    ThreadPoolExecutor.submit = timed_submit  # type: ignore[method-assign,assignment]
    psycopg.Connection.wait = counted_wait  # type: ignore[method-assign]
    psycopg_pool.ConnectionPool.getconn = counted_getconn  # type: ignore[method-assign]
    psycopg.Cursor.execute = counted_execute  # type: ignore[method-assign]
    Redis.execute_command = counted_command  # type: ignore[method-assign]
    Pipeline.execute = counted_pipeline  # type: ignore[method-assign]


def pool_waits() -> dict[str, int]:
    """Time spent waiting for a pooled connection (psycopg_pool's own statistics)."""
    from tenantry_operator import database  # imported by the operator by now

    totals: Counter[str] = Counter()
    for pool in list(database._pools.values()):
        stats = pool.get_stats()
        totals["pg_pool_wait_ms"] += stats.get("requests_wait_ms", 0)
        totals["pg_pool_queued"] += stats.get("requests_queued", 0)
    return {name: round(value) for name, value in totals.items()}


def dump(path: Path) -> None:
    while True:
        with _lock:
            text = json.dumps({**{k: round(v, 1) for k, v in counts.items()},
                               **pool_waits()})
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
        time.sleep(1)


def main() -> None:
    patch()
    threading.Thread(target=dump, args=(Path(os.environ["TENANTRY_BENCH_TRIPS"]),),
                     daemon=True).start()
    runpy.run_module("tenantry_operator", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
