"""Migrations, partitions, idempotent metering and the daily rollup against a real Postgres."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from db_helpers import Conn, connect, q, relation_exists, scalar, scratch_database
from tenantry_devenv.services import Postgres
from tenantry_runtime.contracts import database as contract
from tenantry_runtime.contracts.database import (
    Migration,
    MigrationChecksumError,
    MigrationError,
    ensure_partitions,
    load_migrations,
    migrate,
    rollup_usage,
    tenant_transaction,
)

SHIPPED = [m.version for m in load_migrations()]
NEXT = SHIPPED[-1] + 1  # a version no shipped migration uses
EXPECTED_TABLES = {
    "schema_migrations", "tenants", "documents", "ai_conversations", "ai_conversations_default",
    "ai_usage_logs", "ai_usage_logs_default", "usage_daily", "billing_invoices",
}


@pytest.fixture
def database(postgres: Postgres) -> Iterator[str]:
    with scratch_database(postgres, "mig") as name:
        yield name


@pytest.fixture
def conn(postgres: Postgres, database: str) -> Iterator[Conn]:
    with connect(postgres, database) as c:
        yield c


def tables_of(conn: Conn, schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p')", (schema,)).fetchall()
    return {r[0] for r in rows}


def recorded(conn: Conn, schema: str) -> list[tuple[int, str, str]]:
    return [tuple(r) for r in conn.execute(q(
        "SELECT version, name, checksum FROM {t} ORDER BY version", t=f"{schema}.schema_migrations"
    )).fetchall()]


def test_the_package_ships_numbered_migrations() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == SHIPPED == [1, 2, 3, 4, 5, 6, 8, 9]
    assert all(m.body.strip() and len(m.checksum) == 64 for m in migrations)
    # The same files serve every schema: they must not name one.
    for m in migrations:
        code = b"\n".join(line.split(b"--")[0] for line in m.body.splitlines())
        for word in (b"tenantry", b"search_path", b"public."):
            assert word not in code


def test_migrate_from_empty_applies_every_version(conn: Conn) -> None:
    assert migrate(conn, "tenantry") == SHIPPED
    assert tables_of(conn, "tenantry") == EXPECTED_TABLES
    assert recorded(conn, "tenantry") == [(m.version, m.name, m.checksum)
                                          for m in load_migrations()]
    assert scalar(conn, "SELECT count(*) FROM pg_extension WHERE extname = 'vector'") == 1
    # Every table with tenant rows is RLS-enabled, forced, with the one policy (partitions too).
    rows = conn.execute("""
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               array(SELECT polname FROM pg_policy WHERE polrelid = c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'tenantry' AND c.relkind IN ('r', 'p')
          AND c.relname <> 'schema_migrations'""").fetchall()
    assert len(rows) == len(EXPECTED_TABLES) - 1
    for name, enabled, forced, policies in rows:
        assert (enabled, forced, policies) == (True, True, ["tenant_isolation"]), name


def test_rerun_is_a_no_op(conn: Conn) -> None:
    migrate(conn, "tenantry")
    before = recorded(conn, "tenantry")
    assert migrate(conn, "tenantry") == []
    assert recorded(conn, "tenantry") == before


def test_the_same_files_apply_to_any_schema(conn: Conn) -> None:
    default_path = scalar(conn, "SHOW search_path")
    assert migrate(conn, "tenantry") == SHIPPED
    assert migrate(conn, "tenant_acme") == SHIPPED
    assert tables_of(conn, "tenant_acme") == EXPECTED_TABLES
    assert "documents" not in tables_of(conn, "public")
    # SET LOCAL: the connection's search_path is untouched afterwards.
    assert scalar(conn, "SHOW search_path") == default_path


def test_migrate_works_on_a_non_autocommit_connection(postgres: Postgres, database: str) -> None:
    with psycopg.connect(postgres.dsn(database)) as c:
        assert migrate(c, "tenantry") == SHIPPED
    with connect(postgres, database) as other:  # committed, visible from another session
        assert len(recorded(other, "tenantry")) == len(SHIPPED)


def test_concurrent_migrations_apply_each_version_once(postgres: Postgres, database: str) -> None:
    workers = 4
    barrier = threading.Barrier(workers)

    def run() -> list[int]:
        with connect(postgres, database) as c:
            barrier.wait()
            return migrate(c, "tenantry")

    with ThreadPoolExecutor(workers) as pool:
        results = [f.result() for f in [pool.submit(run) for _ in range(workers)]]
    assert sorted(v for r in results for v in r) == SHIPPED
    with connect(postgres, database) as c:
        assert [v for v, _, _ in recorded(c, "tenantry")] == SHIPPED


def test_a_changed_applied_migration_is_refused(conn: Conn,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(conn, "tenantry")
    original = load_migrations()
    edited = [Migration(m.version, m.name, m.body + b"\n-- edited\n") if m.version == 2 else m
              for m in original]
    monkeypatch.setattr(contract, "load_migrations", lambda: edited)
    with pytest.raises(MigrationChecksumError, match="0002_conversations_usage_logs"):
        migrate(conn, "tenantry")


def test_a_tampered_checksum_record_is_detected(conn: Conn) -> None:
    migrate(conn, "tenantry")
    conn.execute("UPDATE tenantry.schema_migrations SET checksum = 'bogus' WHERE version = 1")
    with pytest.raises(MigrationChecksumError):
        migrate(conn, "tenantry")


def test_a_failing_migration_rolls_back_alone(conn: Conn,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = load_migrations()
    broken = Migration(NEXT, "broken", b"CREATE TABLE half_done (x int); SELECT 1 / 0;")
    monkeypatch.setattr(contract, "load_migrations", lambda: [*shipped, broken])
    with pytest.raises(MigrationError, match=f"{NEXT:04d}_broken"):
        migrate(conn, "tenantry")
    # The shipped ones committed one by one; the broken one left nothing behind.
    assert [v for v, _, _ in recorded(conn, "tenantry")] == SHIPPED
    assert not relation_exists(conn, "tenantry.half_done")
    fixed = Migration(NEXT, "broken", b"CREATE TABLE half_done (x int);")
    monkeypatch.setattr(contract, "load_migrations", lambda: [*shipped, fixed])
    assert migrate(conn, "tenantry") == [NEXT]
    assert relation_exists(conn, "tenantry.half_done")


def test_migrate_refuses_an_open_transaction(postgres: Postgres, database: str) -> None:
    with psycopg.connect(postgres.dsn(database)) as c:
        c.execute("SELECT 1")
        with pytest.raises(MigrationError, match="outside a transaction"):
            migrate(c, "tenantry")


@pytest.mark.parametrize("schema", ["Tenantry", "x; DROP SCHEMA public", "", "a-b", "a" * 64])
def test_migrate_refuses_odd_schema_names(conn: Conn, schema: str) -> None:
    with pytest.raises(ValueError, match="invalid SQL identifier"):
        migrate(conn, schema)


def partitions(conn: Conn, parent: str) -> dict[str, str]:
    rows = conn.execute("""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass""",
        (parent,)).fetchall()
    return dict(rows)


def test_ensure_partitions_creates_months_ahead_idempotently(conn: Conn) -> None:
    migrate(conn, "tenantry")
    created = ensure_partitions(conn, "tenantry", months_ahead=3, today=date(2026, 11, 15))
    months = ["2026_11", "2026_12", "2027_01", "2027_02"]
    assert created == [f"ai_conversations_{m}" for m in months] + [
        f"ai_usage_logs_{m}" for m in months]
    assert ensure_partitions(conn, "tenantry", months_ahead=3, today=date(2026, 11, 15)) == []
    # One more month later: only the new tail is created.
    assert ensure_partitions(conn, "tenantry", months_ahead=3, today=date(2026, 12, 1)) == [
        "ai_conversations_2027_03", "ai_usage_logs_2027_03"]
    bounds = partitions(conn, "tenantry.ai_usage_logs")
    assert bounds["ai_usage_logs_default"] == "DEFAULT"
    assert "2026-12-01" in bounds["ai_usage_logs_2026_12"]
    assert "2027-01-01" in bounds["ai_usage_logs_2026_12"]
    assert len(bounds) == 6  # default + 5 months
    forced = scalar(conn, "SELECT relforcerowsecurity FROM pg_class"
                          " WHERE oid = 'tenantry.ai_usage_logs_2027_03'::regclass")
    assert forced is True


def test_rows_waiting_in_the_default_partition_move_into_a_new_month(conn: Conn) -> None:
    migrate(conn, "tenantry")
    when = datetime(2030, 12, 5, 12, tzinfo=UTC)
    conn.execute("INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at, model,"
                 " input_tokens) VALUES ('acme', 'r1', %s, 'm', 7)", (when,))
    assert scalar(conn, "SELECT count(*) FROM tenantry.ai_usage_logs_default") == 1
    assert ensure_partitions(conn, "tenantry", months_ahead=0, today=date(2030, 12, 1)) == [
        "ai_conversations_2030_12", "ai_usage_logs_2030_12"]
    assert scalar(conn, "SELECT count(*) FROM tenantry.ai_usage_logs_default") == 0
    row = conn.execute("SELECT tableoid::regclass::text, input_tokens, created_at"
                       " FROM tenantry.ai_usage_logs").fetchall()
    assert row == [("tenantry.ai_usage_logs_2030_12", 7, when)]


INSERT_USAGE = """
    INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at, model, input_tokens,
                                        output_tokens, cache_read_input_tokens)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (tenant_id, request_id, created_at) DO NOTHING"""


def test_a_retried_usage_record_is_stored_once(conn: Conn) -> None:
    migrate(conn, "tenantry")
    stamp = datetime.now(UTC)
    with tenant_transaction(conn, "acme"):
        first = conn.execute(INSERT_USAGE, ("acme", "req-1", stamp, "m", 10, 5, 0)).rowcount
        retry = conn.execute(INSERT_USAGE, ("acme", "req-1", stamp, "m", 10, 5, 0)).rowcount
    assert (first, retry) == (1, 0)
    assert scalar(conn, "SELECT count(*) FROM tenantry.ai_usage_logs") == 1
    # The documented limitation: a retry with another timestamp is a new row.
    with tenant_transaction(conn, "acme"):
        conn.execute(INSERT_USAGE, ("acme", "req-1", stamp + timedelta(seconds=1), "m", 10, 5, 0))
    assert scalar(conn, "SELECT count(*) FROM tenantry.ai_usage_logs") == 2


def daily(conn: Conn, day: date) -> set[tuple[str, str, int, int, int, int]]:
    rows = conn.execute("SELECT tenant_id, model, requests, input_tokens, output_tokens,"
                        " cache_read_input_tokens FROM tenantry.usage_daily WHERE day = %s",
                        (day,)).fetchall()
    return {tuple(r) for r in rows}


def test_rollup_numbers_are_exact_and_idempotent(conn: Conn) -> None:
    migrate(conn, "tenantry")
    ensure_partitions(conn, "tenantry", months_ahead=1, today=date(2026, 3, 1))
    day = date(2026, 3, 31)  # the last day of a month: its end falls in the next partition
    start = datetime(2026, 3, 31, tzinfo=UTC)
    logs = [
        ("acme", "r1", start, "opus", 100, 10, 1),
        ("acme", "r2", start + timedelta(hours=23, minutes=59, seconds=59.999), "opus", 50, 5, 2),
        ("acme", "r3", start + timedelta(hours=3), "haiku", 7, 3, 0),
        ("globex", "r1", start + timedelta(hours=12), "opus", 1000, 1, 0),
        # Outside the day, on both sides: must not count.
        ("acme", "r4", start - timedelta(microseconds=1), "opus", 9999, 9999, 0),
        ("acme", "r5", start + timedelta(days=1), "opus", 8888, 8888, 0),
    ]
    for log in logs:
        conn.execute(INSERT_USAGE, log)
    # The session's time zone must not move the day's boundaries (they are UTC).
    conn.execute("SET TIME ZONE 'Pacific/Auckland'")
    expected = {
        ("acme", "opus", 2, 150, 15, 3),
        ("acme", "haiku", 1, 7, 3, 0),
        ("globex", "opus", 1, 1000, 1, 0),
    }
    assert rollup_usage(conn, "tenantry", day) == 3
    assert daily(conn, day) == expected
    assert rollup_usage(conn, "tenantry", day) == 3
    assert daily(conn, day) == expected

    # A late record updates the day; a model whose logs vanished drops out.
    conn.execute(INSERT_USAGE, ("acme", "r6", start + timedelta(hours=1), "opus", 1, 1, 1))
    conn.execute("DELETE FROM tenantry.ai_usage_logs WHERE model = 'haiku'")
    rollup_usage(conn, "tenantry", day)
    assert daily(conn, day) == {("acme", "opus", 3, 151, 16, 4), ("globex", "opus", 1, 1000, 1, 0)}

    # Per tenant, as that tenant: only its rows are touched.
    conn.execute(INSERT_USAGE, ("globex", "r2", start, "opus", 1, 1, 0))
    conn.execute(INSERT_USAGE, ("acme", "r7", start, "opus", 1, 0, 0))
    assert rollup_usage(conn, "tenantry", day, tenant="globex") == 1
    assert daily(conn, day) == {("acme", "opus", 3, 151, 16, 4), ("globex", "opus", 2, 1001, 2, 0)}
