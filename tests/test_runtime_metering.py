"""Usage events -> ai_usage_logs: batches through the write gate, idempotent, nothing lost,
against redis-server and the embedded Postgres (runtime requests made with the SDK)."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import httpx
import httpx2  # the transport of anthropic's SDK
import psycopg
import pytest
from db_helpers import connect, scratch_database
from pydantic import SecretStr
from redis.asyncio import Redis
from runtime_helpers import MODEL, UPSTREAM_KEY, RuntimeServer, serve, usage_events, wait_for
from tenantry_devenv.services import Postgres
from tenantry_runtime.app import create_app
from tenantry_runtime.contracts.database import migrate
from tenantry_runtime.contracts.tenant_locks import TenantMoved
from tenantry_runtime.metering import GROUP, UsageWriter, usage_rows, usage_stream
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.store import TenantStore

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def usage_dsn(postgres: Postgres) -> Iterator[str]:
    """A migrated shared database; the writer connects as its owner."""
    with scratch_database(postgres, "meter") as name, connect(postgres, name) as conn:
        migrate(conn, "tenantry")
        yield postgres.dsn(name)


@pytest.fixture
async def stream_redis(runtime_server: RuntimeServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(runtime_server.redis_url)
    yield redis
    await redis.aclose()


def logged(dsn: str, tenant: str) -> list[tuple[str, str, int, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(
            "SELECT request_id, model, input_tokens, output_tokens FROM tenantry.ai_usage_logs"
            " WHERE tenant_id = %s ORDER BY request_id", (tenant,)).fetchall()]


def call(server: RuntimeServer, tenant: str, text: str, stream: bool = False) -> str:
    client = anthropic.Anthropic(base_url=server.url, api_key=server.keys[tenant]["main"],
                                 max_retries=0)
    if stream:
        with client.messages.stream(model=MODEL, max_tokens=32, messages=[
                {"role": "user", "content": text}]) as events:
            events.get_final_message()
            return str(events.response.headers["request-id"])
    message = client.messages.create(model=MODEL, max_tokens=32,
                                     messages=[{"role": "user", "content": text}])
    return str(message._request_id)


async def test_events_become_one_row_each_and_a_second_drain_adds_none(
        runtime_server: RuntimeServer, stream_redis: Redis, usage_dsn: str) -> None:
    runtime_server.add_tenant("meterone")
    ids = [call(runtime_server, "meterone", "first call"),
           call(runtime_server, "meterone", "a streamed call", stream=True)]
    writer = UsageWriter(stream_redis, usage_dsn, runtime_server.store, "replica-a", batch=1)
    assert await writer.drain("meterone") == 2  # two batches of one: none truncated
    rows = logged(usage_dsn, "meterone")
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {(r[1], r[2]) for r in rows} == {(MODEL, 2), (MODEL, 3)}
    assert await writer.drain("meterone") == 0
    assert logged(usage_dsn, "meterone") == rows
    assert await stream_redis.xlen(usage_stream("meterone")) == 0


async def test_a_writer_that_died_after_inserting_leaves_no_duplicate(
        runtime_server: RuntimeServer, stream_redis: Redis, usage_dsn: str) -> None:
    runtime_server.add_tenant("metercrash")
    for n in range(3):
        call(runtime_server, "metercrash", f"call {n}")
    stream = usage_stream("metercrash")
    dead = UsageWriter(stream_redis, usage_dsn, runtime_server.store, "replica-dead")
    await dead._ensure_group(stream)
    # The dead replica read the entries and committed their rows, but never acknowledged them.
    entries = [e for _, found in await stream_redis.xreadgroup(
        GROUP, "replica-dead", {stream: ">"}) for e in found]
    rows, bad = usage_rows("metercrash", entries)
    assert len(rows) == 3 and bad == []
    dead._write(runtime_server.record("metercrash"), rows[:2])
    alive = UsageWriter(stream_redis, usage_dsn, runtime_server.store, "replica-b",
                        claim_idle_seconds=0)
    assert await alive.drain("metercrash") == 3
    assert len(logged(usage_dsn, "metercrash")) == 3
    assert (await stream_redis.xpending(stream, GROUP))["pending"] == 0


async def test_a_moved_tenant_keeps_its_events_pending_until_the_config_catches_up(
        runtime_server: RuntimeServer, stream_redis: Redis, usage_dsn: str) -> None:
    runtime_server.add_tenant("metermoved")
    request_id = call(runtime_server, "metermoved", "during a move")
    with psycopg.connect(usage_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tenantry.tenants (tenant_id, isolation) VALUES (%s, 'bridge')",
                     ("metermoved",))
    writer = UsageWriter(stream_redis, usage_dsn, runtime_server.store, "replica-c")
    with pytest.raises(TenantMoved):
        await writer.drain("metermoved")
    assert logged(usage_dsn, "metermoved") == []
    assert (await stream_redis.xpending(usage_stream("metermoved"), GROUP))["pending"] == 1
    with psycopg.connect(usage_dsn, autocommit=True) as conn:
        conn.execute("UPDATE tenantry.tenants SET isolation = 'pool' WHERE tenant_id = %s",
                     ("metermoved",))
    assert await writer.drain("metermoved") == 1
    assert [r[0] for r in logged(usage_dsn, "metermoved")] == [request_id]


def test_malformed_and_foreign_entries_are_set_apart() -> None:
    good = (b"1-0", {b"request_id": b"r1", b"event": (
        b'{"request_id":"r1","tenant":"acme","model":"m","input_tokens":1,"output_tokens":2,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
        b'"at":"2026-11-27T10:00:00+00:00"}')})
    foreign = (b"2-0", {b"request_id": b"r1", b"event": good[1][b"event"].replace(
        b'"acme"', b'"other"')})
    broken = (b"3-0", {b"request_id": b"r3", b"event": b"{"})
    rows, bad = usage_rows("acme", [good, foreign, broken])
    assert [r[1] for r in rows] == ["r1"] and bad == [b"2-0", b"3-0"]


def test_the_app_writes_usage_rows_when_a_database_is_configured(
        runtime_server: RuntimeServer, upstream_stub: tuple[str, object], usage_dsn: str,
        tmp_path: Path) -> None:
    runtime_server.add_tenant("meterapp")
    # Its own tenants directory: this app's writer must not drain other tests' tenants.
    shutil.copy(runtime_server.tenants_dir / "meterapp.json", tmp_path / "meterapp.json")
    settings = RuntimeSettings(
        tenants_dir=tmp_path, config_poll_seconds=0.1,
        redis_url=SecretStr(runtime_server.redis_url), upstream_url=upstream_stub[0],
        upstream_api_key=SecretStr(UPSTREAM_KEY), database_url=SecretStr(usage_dsn),
        usage_flush_seconds=0.1)
    with serve(create_app(settings)) as url:
        client = anthropic.Anthropic(base_url=url, api_key=runtime_server.keys["meterapp"][
            "main"], max_retries=0)
        message = client.messages.create(model=MODEL, max_tokens=16, messages=[
            {"role": "user", "content": "metered"}])
        started = time.monotonic()
        wait_for(lambda: logged(usage_dsn, "meterapp"), 15, "the usage row")
        assert httpx.get(f"{url}/readyz").status_code == 200
    assert logged(usage_dsn, "meterapp") == [(message._request_id, MODEL, 1, 2)]
    assert time.monotonic() - started < 15
    assert usage_events(runtime_server.redis_url, "meterapp") == []


def test_not_ready_while_postgres_is_unreachable(
        runtime_server: RuntimeServer, upstream_stub: tuple[str, object]) -> None:
    from tenantry_devenv.processes import free_port

    settings = RuntimeSettings(
        redis_url=SecretStr(runtime_server.redis_url), upstream_url=upstream_stub[0],
        database_url=SecretStr(f"postgresql://x:y@127.0.0.1:{free_port()}/none"))
    with serve(create_app(settings, TenantStore())) as url:  # no tenants: nothing to write
        ready = httpx.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["problems"] == ["postgres: OperationalError"]


async def test_sigkill_under_load_then_restart_every_complete_response_has_exactly_one_row(
        runtime_server: RuntimeServer, upstream_stub: tuple[str, object], usage_dsn: str,
        tmp_path: Path) -> None:
    import asyncio
    import os
    import signal
    import sys

    from tenantry_devenv.processes import free_port, spawn, wait_until

    runtime_server.add_tenant("meterkill")
    key = runtime_server.keys["meterkill"]["main"]
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    shutil.copy(runtime_server.tenants_dir / "meterkill.json", tenants / "meterkill.json")
    port = free_port()
    env = {"TENANTRY_RUNTIME_TENANTS_DIR": str(tenants),
           "TENANTRY_RUNTIME_REDIS_URL": runtime_server.redis_url,
           "TENANTRY_RUNTIME_UPSTREAM_URL": upstream_stub[0],
           "TENANTRY_RUNTIME_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "TENANTRY_RUNTIME_DATABASE_URL": usage_dsn,
           "TENANTRY_RUNTIME_USAGE_FLUSH_SECONDS": "0.2"}

    def start(name: str) -> object:
        process = spawn(name, [sys.executable, "-m", "tenantry_runtime", "--host", "127.0.0.1",
                               "--port", str(port)], tmp_path / f"{name}.log", env=env)
        wait_until("the runtime", lambda: httpx.get(
            f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200, process, 60)
        return process

    first = start("runtime-1")
    complete: list[str] = []
    client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key=key,
                                      max_retries=0, timeout=10)

    async def worker(n: int) -> None:
        for i in range(10_000):
            try:
                if (n + i) % 2:
                    async with client.messages.stream(model=MODEL, max_tokens=16, messages=[
                            {"role": "user", "content": f"w{n} r{i}"}]) as stream:
                        await stream.get_final_message()
                        complete.append(stream.response.headers["request-id"])
                else:
                    message = await client.messages.create(model=MODEL, max_tokens=16, messages=[
                        {"role": "user", "content": f"w{n} r{i}"}])
                    complete.append(str(message._request_id))
            except (anthropic.APIError, httpx2.TransportError):
                # The runtime was killed under us: before the answer (APIError) or in the
                # middle of a stream's body, which the SDK hands up as the transport's error.
                return

    load = asyncio.gather(*(worker(n) for n in range(16)))
    await asyncio.sleep(2.0)
    os.kill(first.pid, signal.SIGKILL)
    await load
    await client.close()
    assert len(complete) > 20
    second = start("runtime-2")
    try:
        def rows() -> list[tuple[str, int]]:
            with psycopg.connect(usage_dsn, autocommit=True) as conn:
                return [tuple(r) for r in conn.execute(
                    "SELECT request_id, count(*) FROM tenantry.ai_usage_logs"
                    " WHERE tenant_id = 'meterkill' GROUP BY request_id").fetchall()]

        wait_for(lambda: set(complete) <= {r[0] for r in rows()}, 30,
                 "every complete response's usage row")
    finally:
        second.stop()
    counted = dict(rows())
    assert all(n == 1 for n in counted.values())
    # Rows beyond the complete responses: settled requests whose last bytes were cut by the kill.
    assert len(counted) - len(complete) <= 16
