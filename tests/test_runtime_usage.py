"""Usage for billing: migration 0005, metering into pool and bridge tenants' own tables,
GET /v1/usage as the tenant, and Postgres outages (real Postgres, Redis, runtime, SDK)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from db_helpers import connect, create_login_role, drop_roles, scratch_database, unique
from pydantic import SecretStr
from redis.asyncio import Redis
from runtime_helpers import (
    MODEL,
    usage_events,
    wait_for,
)
from tenantry_devenv.processes import free_port
from tenantry_devenv.services import Postgres
from tenantry_operator.database import bootstrap_shared, ensure_bridge_tenant, ensure_pool_tenant
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    bridge_role,
    bridge_schema,
    load_migrations,
    migrate,
    rollup_usage,
)
from tenantry_runtime.contracts.runtime_config import DatabaseLocation
from tenantry_runtime.contracts.tenant_locks import hold_writes
from tenantry_runtime.metering import GROUP, UsageWriter, usage_rows, usage_stream
from tenantry_runtime.usage import usage_window
from usage_helpers import App, running_app, runtime_of

pytestmark = pytest.mark.timeout(180)

BILLING_COLUMNS = {"cost": "numeric", "currency": "text", "price_version": "text",
                   "latency_ms": "numeric", "status": "smallint", "endpoint": "text",
                   "api_key_name": "text", "stream": "boolean"}


@dataclass
class Shared:
    """A bootstrapped shared database: the admin DSN and the runtime's login (an APP_ROLE
    member, so RLS really filters)."""

    postgres: Postgres
    name: str
    admin_dsn: str
    app_dsn: str
    roles: list[str]

    def bridge_tenant(self, tenant: str) -> str:
        """A real bridge tenant (role, schema, registry row); its login DSN."""
        password = secrets.token_hex(12)
        with connect(self.postgres, self.name) as conn:
            ensure_bridge_tenant(conn, tenant, password)
        self.roles.append(bridge_role(tenant))
        return self.postgres.dsn(self.name, bridge_role(tenant), password)

    def pool_tenant(self, tenant: str) -> None:
        with connect(self.postgres, self.name) as conn:
            ensure_pool_tenant(conn, tenant)


@pytest.fixture(scope="module")
def shared(postgres: Postgres) -> Iterator[Shared]:
    login, password = unique("runtimeapp"), secrets.token_hex(12)
    with scratch_database(postgres, "usage") as name:
        with connect(postgres, name) as conn:
            bootstrap_shared(conn)
            create_login_role(conn, login, password, APP_ROLE)
        found = Shared(postgres, name, postgres.dsn(name),
                       postgres.dsn(name, login, password), [login])
        yield found
    drop_roles(postgres, found.roles)


def bridge_location(tenant: str) -> dict[str, Any]:
    return {"isolation": "bridge",
            "database": DatabaseLocation(kind="schema", schema_name=bridge_schema(tenant))}


def with_dsn(app: App, tenant: str, dsn: str | None) -> None:
    record = app.server.record(tenant)
    app.server.write(record.model_copy(update={
        "database_dsn": None if dsn is None else SecretStr(dsn)}))


def rows_in(dsn: str, schema: str, tenant: str) -> list[dict[str, Any]]:
    """The tenant's usage rows read as the admin (no RLS)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {schema}.ai_usage_logs WHERE tenant_id = %s"  # noqa: S608
                    " ORDER BY request_id", (tenant,))
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# --- migration 0005 ---------------------------------------------------------------------------


def test_0005_adds_the_billing_columns_everywhere_and_can_run_twice(shared: Shared) -> None:
    tenant = unique("usgmig")
    shared.bridge_tenant(tenant)
    with connect(shared.postgres, shared.name) as conn:
        for schema in ("tenantry", bridge_schema(tenant)):
            columns = dict(conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = 'ai_usage_logs'",
                (schema,)).fetchall())
            assert {c: columns.get(c) for c in BILLING_COLUMNS} == BILLING_COLUMNS
            assert migrate(conn, schema) == []  # applied once, recorded
        # IF NOT EXISTS: the body itself is idempotent (a half-applied history converges).
        body = next(m.body for m in load_migrations() if m.version == 5)
        with conn.transaction():
            conn.execute("SET LOCAL search_path TO tenantry, public")
            conn.execute(body)
        # Exact arithmetic: numeric keeps every digit a float would lose.
        value = conn.execute("SELECT 0.1::numeric(20,10) + 0.2::numeric(20,10)").fetchone()
        assert value is not None and value[0] == Decimal("0.3")


# --- metering into the tenant's own tables ----------------------------------------------------


@contextmanager
def silo_database(shared: Shared, tenant: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A migrated database standing in for a silo's (its DSN), and the tenant's location."""
    with connect(shared.postgres, shared.name) as conn:
        ensure_pool_tenant(conn, tenant, "silo")  # the registry row: the gate, in the SHARED db
    with scratch_database(shared.postgres, "silo") as silo_db:
        with connect(shared.postgres, silo_db) as conn:
            migrate(conn, "tenantry")
        yield shared.postgres.dsn(silo_db), {"isolation": "silo", "database": DatabaseLocation(
            kind="dedicated", schema_name="tenantry", database=silo_db)}


def check_row(row: dict[str, Any], event: dict[str, Any]) -> None:
    assert row["cost"] == Decimal(event["cost"]) and row["cost"] > 0
    assert (row["currency"], row["price_version"]) == (event["currency"],
                                                       event["price_version"])
    assert (row["status"], row["endpoint"], row["api_key_name"], row["stream"]) == (
        200, "shared", "main", event["stream"])
    assert row["latency_ms"] == Decimal(str(event["latency_ms"]))
    assert row["input_tokens"] == event["input_tokens"]


async def test_pool_and_bridge_usage_lands_where_the_tenant_lives_exactly_once(
        shared: Shared, redis_server: Any, upstream_stub: tuple[str, object],
        tmp_path: Path) -> None:
    pool, bridge = unique("usgpool"), unique("usgbridge")
    shared.pool_tenant(pool)
    bridge_dsn = shared.bridge_tenant(bridge)
    # No writer in this app: the test drives it, to check idempotence step by step.
    with running_app(tmp_path, redis_server.url, upstream_stub[0], None) as app:
        app.server.add_tenant(pool)
        app.server.add_tenant(bridge, **bridge_location(bridge))
        with_dsn(app, bridge, bridge_dsn)
        for tenant in (pool, bridge):
            app.call(tenant, "one")
            app.call(tenant, "two", stream=True)
        events = {t: {e["request_id"]: e for e in usage_events(redis_server.url, t)}
                  for t in (pool, bridge)}
        redis = Redis.from_url(redis_server.url)
        try:
            writer = UsageWriter(redis, shared.app_dsn, app.server.store, "usage-a")
            assert await writer.drain(pool) == 2
            assert await writer.drain(bridge) == 2
            # A writer that died after its commit but before the ack: the entries come back,
            # the rows do not double.
            app.call(bridge, "three")
            stream = usage_stream(bridge)
            entries = [e for _, found in await redis.xreadgroup(
                GROUP, "usage-dead", {stream: ">"}) for e in found]
            rows, _ = usage_rows(bridge, entries)
            writer._write(app.server.record(bridge), rows)
            again = UsageWriter(redis, shared.app_dsn, app.server.store, "usage-b",
                                claim_idle_seconds=0)
            assert await again.drain(bridge) == 1
            assert (await redis.xpending(stream, GROUP))["pending"] == 0
            events[bridge].update({e["request_id"]: e for e in (
                json.loads(f[b"event"]) for _, f in entries)})
        finally:
            await redis.aclose()
    assert [r["request_id"] for r in rows_in(shared.admin_dsn, "tenantry", bridge)] == []
    for tenant, schema in ((pool, "tenantry"), (bridge, bridge_schema(bridge))):
        found = rows_in(shared.admin_dsn, schema, tenant)
        assert sorted(r["request_id"] for r in found) == sorted(events[tenant])
        for row in found:
            check_row(row, events[tenant][row["request_id"]])


@contextmanager
def gate_held(shared: Shared, silo: str, _: str) -> Iterator[None]:
    """An isolation change of the silo tenant: its gate row, in the SHARED database."""
    with psycopg.connect(shared.admin_dsn) as holder:
        hold_writes(holder, silo)
        yield
        holder.rollback()


@contextmanager
def usage_table_locked(_: Shared, __: str, silo_dsn: str) -> Iterator[None]:
    """The silo's admin (the tenant's) locking its usage table, in its own database."""
    with psycopg.connect(silo_dsn) as locker:
        locker.execute("LOCK TABLE tenantry.ai_usage_logs IN SHARE MODE")  # no INSERT
        yield
        locker.rollback()


@pytest.mark.parametrize("hold", [gate_held, usage_table_locked])
def test_silo_usage_lands_in_its_own_database_and_a_held_silo_stalls_no_one(
        shared: Shared, redis_server: Any, upstream_stub: tuple[str, object],
        tmp_path: Path, hold: Callable[[Shared, str, str], AbstractContextManager[None]]
        ) -> None:
    """While the silo's writes are held, the writer gives up on them after
    `gate_wait_seconds` (and, in the silo's database, its statement timeout) instead of
    waiting for good: the writer serves every tenant, so the others are still metered."""
    silo = unique("usgsilo")
    with silo_database(shared, silo) as (silo_dsn, location):
        with running_app(tmp_path, redis_server.url, upstream_stub[0], shared.app_dsn) as app:
            app.server.add_tenant(silo, **location)
            with_dsn(app, silo, silo_dsn)
            pool = unique("usgbeside")
            shared.pool_tenant(pool)
            app.server.add_tenant(pool)
            with hold(shared, silo, silo_dsn):
                request_id = app.call(silo, "held")
                writer = runtime_of(app).writer
                wait_for(lambda: writer.failures["usage_gate_busy"] >= 1, 15,
                         "the silo's write giving up")
                beside = app.call(pool, "not stuck behind the silo")
                wait_for(lambda: rows_in(shared.admin_dsn, "tenantry", pool), 15,
                         "the other tenant's row while the silo is held")
                assert rows_in(silo_dsn, "tenantry", silo) == []
            assert [r["request_id"] for r in rows_in(shared.admin_dsn, "tenantry", pool)] == [
                beside]
            wait_for(lambda: rows_in(silo_dsn, "tenantry", silo), 15, "the silo row")
            [day] = app.usage(silo).json()["data"]
            assert day["requests"] == 1 and Decimal(day["cost"]) > 0
        assert [r["request_id"] for r in rows_in(silo_dsn, "tenantry", silo)] == [request_id]
        assert rows_in(shared.admin_dsn, "tenantry", silo) == []


def test_a_bridge_tenants_usage_needs_no_login_of_its_own(
        shared: Shared, redis_server: Any, upstream_stub: tuple[str, object],
        tmp_path: Path) -> None:
    """The runtime's role meters a bridge tenant (its own login may only read usage)."""
    bridge = unique("usgnodsn")
    shared.bridge_tenant(bridge)
    with running_app(tmp_path, redis_server.url, upstream_stub[0], shared.app_dsn) as app:
        app.server.add_tenant(bridge, **bridge_location(bridge))
        assert app.server.record(bridge).database_dsn is None
        request_id = app.call(bridge, "metered")
        wait_for(lambda: rows_in(shared.admin_dsn, bridge_schema(bridge), bridge), 15,
                 "the bridge row")
        assert app.server.app.state.runtime.writer.failures[
            "usage_no_database_credentials"] == 0
    assert [r["request_id"] for r in rows_in(shared.admin_dsn, bridge_schema(bridge),
                                             bridge)] == [request_id]


async def test_a_silo_tenant_without_credentials_keeps_its_usage_in_redis(
        shared: Shared, redis_server: Any, upstream_stub: tuple[str, object],
        tmp_path: Path) -> None:
    silo = unique("usgsilonodsn")
    with silo_database(shared, silo) as (silo_dsn, location), \
            running_app(tmp_path, redis_server.url, upstream_stub[0], shared.app_dsn) as app:
        app.server.add_tenant(silo, **location)
        request_id = app.call(silo, "waits")
        wait_for(lambda: app.server.app.state.runtime.writer.failures[
            "usage_no_database_credentials"] > 0, 10, "the writer to see the tenant")
        assert rows_in(silo_dsn, "tenantry", silo) == []
        with_dsn(app, silo, silo_dsn)
        wait_for(lambda: rows_in(silo_dsn, "tenantry", silo), 15, "the row once the DSN is known")
        assert [r["request_id"] for r in rows_in(silo_dsn, "tenantry", silo)] == [request_id]


# --- Postgres down ----------------------------------------------------------------------------


def test_postgres_down_chat_goes_on_usage_waits_in_redis_then_lands_once(
        shared: Shared, redis_server: Any, upstream_stub: tuple[str, object],
        tmp_path: Path) -> None:
    pool, silo = unique("usgpgpool"), unique("usgpgsilo")
    shared.pool_tenant(pool)
    closed = f"postgresql://x:y@127.0.0.1:{free_port()}/none"
    # The silo tenant's database is unreachable (its DSN points at a closed port) ...
    with silo_database(shared, silo) as (silo_dsn, location), \
            running_app(tmp_path, redis_server.url, upstream_stub[0], shared.app_dsn) as app:
        app.server.add_tenant(silo, **location)
        with_dsn(app, silo, closed)
        ids = [app.call(silo, f"while down {n}", stream=bool(n % 2)) for n in range(3)]
        writer = app.server.app.state.runtime.writer
        wait_for(lambda: writer.failures["usage_write_error"] >= 2, 10, "failed writes")
        assert len(usage_events(redis_server.url, silo)) == 3  # all kept in Redis
        # ... and comes back: the same events land, once each.
        with_dsn(app, silo, silo_dsn)
        wait_for(lambda: len(rows_in(silo_dsn, "tenantry", silo)) == 3, 15,
                 "the silo rows after recovery")
        found = rows_in(silo_dsn, "tenantry", silo)
        assert sorted(r["request_id"] for r in found) == sorted(ids)
    # The whole shared database unreachable: chat still answers, on the cached config.
    with running_app(tmp_path, redis_server.url, upstream_stub[0], closed) as app:
        app.server.add_tenant(pool)
        pool_ids = [app.call(pool, f"pg down {n}") for n in range(3)]
        pool_record = app.server.record(pool)
        assert httpx.get(f"{app.server.url}/readyz", timeout=10).status_code == 503
        assert app.usage(pool).status_code == 503
        assert app.usage(pool).json()["error"]["type"] == "api_error"
    assert rows_in(shared.admin_dsn, "tenantry", pool) == []
    with running_app(tmp_path, redis_server.url, upstream_stub[0], shared.app_dsn) as app:
        # The same record again (add_tenant would reset the tenant's Redis keys).
        app.server.write(pool_record)
        wait_for(lambda: len(rows_in(shared.admin_dsn, "tenantry", pool)) == 3, 15,
                 "the pool rows after recovery")
    assert sorted(r["request_id"] for r in rows_in(shared.admin_dsn, "tenantry", pool)) == \
        sorted(pool_ids)


# --- GET /v1/usage ----------------------------------------------------------------------------


def test_usage_by_day_and_model_as_the_tenant_and_never_another_tenants(
        shared: Shared, redis_server: Any, upstream_stub: tuple[str, object],
        tmp_path: Path) -> None:
    first, second, bridge = unique("usga"), unique("usgb"), unique("usgbr")
    shared.pool_tenant(first)
    shared.pool_tenant(second)
    bridge_dsn = shared.bridge_tenant(bridge)
    with running_app(tmp_path, redis_server.url, upstream_stub[0], shared.app_dsn) as app:
        app.server.add_tenant(first)
        app.server.add_tenant(second)
        app.server.add_tenant(bridge, **bridge_location(bridge))
        with_dsn(app, bridge, bridge_dsn)
        for _ in range(3):
            app.call(first, "a question for a")
        app.call(second, "b")
        app.call(bridge, "bridge question", stream=True)
        for tenant, count in ((first, 3), (second, 1), (bridge, 1)):
            wait_for(lambda t=tenant, n=count: app.usage(t).json()["data"]
                     and app.usage(t).json()["data"][0]["requests"] == n, 15, f"usage of {tenant}")
        events = usage_rows_of(shared, first)
        answer = app.usage(first).json()
        today = datetime.now(UTC).date().isoformat()
        assert answer["to"] == today
        [day] = answer["data"]
        assert day == {
            "date": today, "model": MODEL, "requests": 3,
            "input_tokens": sum(r["input_tokens"] for r in events),
            "output_tokens": sum(r["output_tokens"] for r in events),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "cost": f"{sum(r['cost'] for r in events).normalize():f}", "currency": "USD",
            "unpriced_requests": 0}
        # The daily rollup carries the exact cost too.
        with connect(shared.postgres, shared.name) as conn:
            rollup_usage(conn, "tenantry", datetime.now(UTC).date(), tenant=first)
            rolled = conn.execute("SELECT requests, cost FROM tenantry.usage_daily"
                                  " WHERE tenant_id = %s", (first,)).fetchall()
        assert rolled == [(3, sum(r["cost"] for r in events))]
        # B's key never sees A's rows (and the other way round).
        assert [d["requests"] for d in app.usage(second).json()["data"]] == [1]
        assert [d["requests"] for d in app.usage(bridge).json()["data"]] == [1]
        # A window without traffic.
        past = app.usage(first, **{"from": "2020-01-01", "to": "2020-01-31"})
        assert past.status_code == 200 and past.json()["data"] == []
        for params, fragment in (({"from": "yesterday"}, "from: expected a date"),
                                 ({"to": "2026-13-01"}, "to: expected a date"),
                                 ({"from": "2026-02-02", "to": "2026-02-01"}, "is after"),
                                 ({"from": "2020-01-01", "to": "2026-01-01"}, "spans more")):
            refused = app.usage(first, **params)
            assert refused.status_code == 400, params
            assert refused.json()["error"]["type"] == "invalid_request_error"
            assert fragment in refused.json()["error"]["message"]
        assert httpx.get(f"{app.server.url}/v1/usage", timeout=10).status_code == 401


def usage_rows_of(shared: Shared, tenant: str) -> list[dict[str, Any]]:
    return rows_in(shared.admin_dsn, "tenantry", tenant)


def test_rls_alone_hides_other_tenants_usage_from_the_runtime_login(shared: Shared) -> None:
    """The query names the tenant, and RLS filters too: as tenant A, B's rows do not exist."""
    a, b = unique("usgrlsa"), unique("usgrlsb")
    stamp = datetime.now(UTC)
    with psycopg.connect(shared.admin_dsn, autocommit=True) as conn:
        for tenant in (a, b):
            conn.execute("INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at,"
                         " model, cost) VALUES (%s, 'r', %s, 'm', 1)", (tenant, stamp))
    with psycopg.connect(shared.app_dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.current_tenant', %s, true)", (a,))
        seen = conn.execute("SELECT tenant_id FROM tenantry.ai_usage_logs WHERE tenant_id"
                            " IN (%s, %s)", (a, b)).fetchall()
    assert seen == [(a,)]


def test_usage_window_defaults_and_bounds() -> None:
    today = datetime(2026, 3, 31, tzinfo=UTC).date()
    window = usage_window(None, None, today)
    assert (window.first, window.last) == (today - timedelta(days=29), today)
    assert usage_window("2026-03-01", None, today).first.isoformat() == "2026-03-01"
    lower, upper = usage_window("2026-03-31", "2026-03-31", today).bounds()
    assert upper - lower == timedelta(days=1) and lower.tzinfo is UTC
