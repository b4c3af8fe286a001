"""Usage export to OpenMeter (issue 10): payloads, retries, checkpoints, and a crash midway.

Real parts: the embedded Postgres (a scratch database migrated like the shared one), the
exporter as a subprocess (`python -m tenantry_runtime.export`), and an OpenMeter stand-in
under uvicorn that validates every request and deduplicates on (source, id) as OpenMeter does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from billing_standins import OpenMeterStandIn, StripeStandIn, cloudevent_problems
from db_helpers import scratch_database
from psycopg import sql
from pydantic import SecretStr
from runtime_helpers import serve, wait_for
from tenantry_devenv.services import Postgres
from tenantry_runtime.contracts.database import bridge_schema, migrate
from tenantry_runtime.export import (
    ExportRejected,
    ExportSettings,
    OpenMeterSink,
    UsageExporter,
    UsageRecord,
    cloud_event,
    read_checkpoint,
    stripe_meter_event,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORTER = [sys.executable, "-m", "tenantry_runtime.export"]
SCHEMA = "tenantry"
TENANTS = ("acme", "globex", "initech")
T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
def usage_db(postgres: Postgres) -> Iterator[str]:
    with scratch_database(postgres, "export") as name:
        dsn = postgres.dsn(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, SCHEMA)
        yield dsn


def insert_usage(dsn: str, first: int, count: int, per_transaction: int = 37,
                 created_at: datetime = T0, schema: str = SCHEMA,
                 tenants: tuple[str, ...] = TENANTS) -> list[str]:
    """`count` usage rows spread over tenants and several transactions; their request ids."""
    ids = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(first, first + count, per_transaction):
            rows = []
            for n in range(start, min(start + per_transaction, first + count)):
                request_id = f"req_{n:06d}"
                ids.append(request_id)
                rows.append((tenants[n % len(tenants)], request_id,
                             created_at + timedelta(seconds=n), "claude-sonnet-4-5", 100 + n,
                             20, n % 2, 0, Decimal("0.000123") * n, "USD", "2026-11-01"))
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql.SQL(
                    "INSERT INTO {}.ai_usage_logs (tenant_id, request_id, created_at,"
                    " model, input_tokens, output_tokens, cache_creation_input_tokens,"
                    " cache_read_input_tokens, cost, currency, price_version)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)").format(
                    sql.Identifier(schema)), rows)
    return ids


def settings_for(dsn: str, url: str, **changes: Any) -> ExportSettings:
    values: dict[str, Any] = {
        "database_url": SecretStr(dsn), "openmeter_url": url, "batch_size": 50,
        "backoff_seconds": 0.01, "backoff_max_seconds": 0.05, "interval_seconds": 0.05,
        **changes}
    return ExportSettings(**values)


def export_all(dsn: str, settings: ExportSettings) -> int:
    sink = OpenMeterSink.from_settings(settings)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            exporter = UsageExporter(conn, sink, settings)
            exporter.prepare()
            return exporter.export_pending()
    finally:
        sink.close()


def test_cloud_event_shape_is_what_openmeter_ingests() -> None:
    record = UsageRecord("42", "acme", "req_1", T0, "claude-sonnet-4-5", 10, 5, 2, 3,
                         Decimal("0.0012300000"), "USD", "2026-11-01")
    event = cloud_event(record, "tenantry", "tenantry.ai.usage")
    assert cloudevent_problems(event) == []
    assert event == {
        "specversion": "1.0", "id": "req_1", "source": "tenantry", "type": "tenantry.ai.usage",
        "subject": "acme", "time": "2026-11-03T12:00:00Z", "datacontenttype": "application/json",
        "data": {"model": "claude-sonnet-4-5", "input_tokens": 10, "output_tokens": 5,
                 "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "tokens": 20,
                 "cost": "0.00123", "currency": "USD", "price_version": "2026-11-01"}}
    unpriced = cloud_event(UsageRecord("1", "acme", "req_2", T0, "m", 1, 1, 0, 0, None, None,
                                       None), "tenantry", "t")
    assert "cost" not in unpriced["data"]  # no made-up zero for a row the price table missed
    # The stand-in is not a pushover: it refuses what OpenMeter would.
    assert cloudevent_problems({**event, "specversion": "0.3", "subject": ""}) == [
        "specversion must be '1.0', got '0.3'", "subject must be a non-empty string"]


def test_retries_429_and_5xx_then_exports_each_row_once(usage_db: str) -> None:
    ids = insert_usage(usage_db, 0, 120)
    stand_in = OpenMeterStandIn(token="om-secret", fail_next=[(429, "0"), (503, None), (502, None)])
    with serve(stand_in.app()) as url:
        sent = export_all(usage_db, settings_for(usage_db, url,
                                                 openmeter_token=SecretStr("om-secret")))
        assert sent == 120
        assert stand_in.failures_sent == 3 and stand_in.rejected == []
        assert sorted(stand_in.accepted_ids()) == ids  # once each
        assert {e["subject"] for e in stand_in.accepted} == set(TENANTS)
        # Nothing pending: a second run sends nothing, the checkpoint says so.
        assert export_all(usage_db, settings_for(usage_db, url,
                                                 openmeter_token=SecretStr("om-secret"))) == 0
        assert stand_in.batches == 3 and stand_in.duplicates == 0


def test_every_schema_with_usage_is_exported_with_its_own_checkpoint(usage_db: str) -> None:
    """The default "*": the shared schema's pool tenants and each bridge tenant's schema."""
    bridge = bridge_schema("umbrella")
    with psycopg.connect(usage_db, autocommit=True) as conn:
        migrate(conn, bridge)
    ids = insert_usage(usage_db, 0, 60) + insert_usage(usage_db, 100, 30, schema=bridge,
                                                       tenants=("umbrella",))
    stand_in = OpenMeterStandIn()
    with serve(stand_in.app()) as url:
        assert export_all(usage_db, settings_for(usage_db, url)) == 90
        more = insert_usage(usage_db, 200, 5, schema=bridge, tenants=("umbrella",))
        assert export_all(usage_db, settings_for(usage_db, url)) == 5
        # One schema only, when asked: its checkpoint is the same one.
        assert export_all(usage_db, settings_for(usage_db, url, schema_name=bridge)) == 0
    assert sorted(stand_in.accepted_ids()) == sorted(ids + more)
    assert stand_in.duplicates == 0
    with psycopg.connect(usage_db, autocommit=True) as conn:
        assert sorted(conn.execute(
            "SELECT source_schema, exported FROM tenantry_private.usage_export_checkpoints"
        ).fetchall()) == sorted([(SCHEMA, 60), (bridge, 35)])


def test_a_refused_batch_stops_the_export_and_keeps_the_checkpoint(usage_db: str) -> None:
    insert_usage(usage_db, 0, 10)
    stand_in = OpenMeterStandIn(token="right")
    with serve(stand_in.app()) as url, pytest.raises(ExportRejected, match="HTTP 401"):
        export_all(usage_db, settings_for(usage_db, url, openmeter_token=SecretStr("wrong")))
    with psycopg.connect(usage_db, autocommit=True) as conn:
        assert read_checkpoint(conn, "openmeter", SCHEMA)[1] == ""  # still before the first row
    assert stand_in.accepted == []


def test_transaction_ids_are_ordered_as_numbers_not_text(usage_db: str) -> None:
    """'10' < '9' as text: ordered so, one-row batches would checkpoint past xid 9."""
    insert_usage(usage_db, 0, 3, per_transaction=1)
    with psycopg.connect(usage_db, autocommit=True) as conn:
        for xid, request_id in (("100", "req_000000"), ("9", "req_000001"),
                                ("10", "req_000002")):
            conn.execute("UPDATE tenantry.ai_usage_logs SET export_xid = %s::xid8"
                         " WHERE request_id = %s", (xid, request_id))
    stand_in = OpenMeterStandIn()
    with serve(stand_in.app()) as url:
        assert export_all(usage_db, settings_for(usage_db, url, batch_size=1)) == 3
    assert stand_in.accepted_ids() == ["req_000001", "req_000002", "req_000000"]


def test_a_row_committed_late_with_an_older_timestamp_is_not_skipped(usage_db: str) -> None:
    """created_at is the request's start; rows arrive later and out of order."""
    stand_in = OpenMeterStandIn()
    with serve(stand_in.app()) as url, psycopg.connect(usage_db) as slow:
        # A writer's transaction takes a while; meanwhile a later request's row commits.
        slow.execute("INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at,"
                     " model) VALUES ('acme', 'req_early', %s, 'm')", (T0,))
        insert_usage(usage_db, 1, 5, created_at=T0 + timedelta(minutes=5))
        settings = settings_for(usage_db, url)
        # The committed rows wait behind the running transaction: sending them now and
        # checkpointing past them would skip req_early once it commits.
        assert export_all(usage_db, settings) == 0
        slow.commit()
        assert export_all(usage_db, settings) == 6
    assert sorted(stand_in.accepted_ids()) == sorted(["req_early"] + [
        f"req_{n:06d}" for n in range(1, 6)])


def exporter_env(usage_db: str, **settings: str) -> dict[str, str]:
    return {**os.environ, "TENANTRY_EXPORT_DATABASE_URL": usage_db,
            "TENANTRY_EXPORT_BATCH_SIZE": "50", "TENANTRY_EXPORT_INTERVAL_SECONDS": "0.05",
            "TENANTRY_EXPORT_BACKOFF_SECONDS": "0.01",
            # This checkout's packages, whatever the venv has installed.
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "runtime"),
                                           os.environ.get("PYTHONPATH", "")]),
            **{f"TENANTRY_EXPORT_{k.upper()}": v for k, v in settings.items()}}


def kill_midway(env: dict[str, str], reached: Callable[[], bool]) -> None:
    """Run the exporter until `reached`, then SIGKILL it: no chance to clean up."""
    exporter = subprocess.Popen(EXPORTER, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: reached() or exporter.poll() is not None, 60, "the exporter midway")
        assert exporter.poll() is None, exporter.communicate()[0].decode()
        exporter.send_signal(signal.SIGKILL)
        exporter.wait(10)
    finally:
        if exporter.poll() is None:
            exporter.kill()


def resume_once(env: dict[str, str]) -> None:
    done = subprocess.run([*EXPORTER, "--once"], env=env, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def exported_count(usage_db: str) -> int:
    with psycopg.connect(usage_db, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(exported), 0) FROM"
                           " tenantry_private.usage_export_checkpoints").fetchone()
    assert row is not None
    return int(row[0])


def test_exporter_killed_midway_resumes_and_the_provider_gets_every_event_once(
        usage_db: str) -> None:
    ids = insert_usage(usage_db, 0, 500)
    # After 3 acknowledged batches the 4th is recorded but its acknowledgement held: the kill
    # lands between the provider taking a batch and the checkpoint moving, the worst moment.
    stand_in = OpenMeterStandIn(hold_after_batches=3)
    with serve(stand_in.app()) as url:
        env = exporter_env(usage_db, openmeter_url=url)
        kill_midway(env, lambda: stand_in.batches >= 4)
        assert exported_count(usage_db) == 150  # three acknowledged batches, not the held one
        with psycopg.connect(usage_db, autocommit=True) as conn:
            assert read_checkpoint(conn, "openmeter", SCHEMA)[0] != "0"
        assert len(stand_in.accepted_ids()) == 200  # the provider has the 4th batch already
        # Usage keeps arriving while the exporter is down.
        ids += insert_usage(usage_db, 500, 40)
        stand_in.hold_after_batches = None
        stand_in.release.set()
        resume_once(env)
    accepted = stand_in.accepted_ids()
    assert sorted(accepted) == sorted(ids)  # every event, once, nothing skipped
    assert len(set(accepted)) == len(accepted) == 540
    assert stand_in.duplicates == 50  # the held batch was resent and dropped by id
    assert stand_in.rejected == []
    assert exported_count(usage_db) == 540


STRIPE_KEY = "sk_test_tenantry"
CUSTOMERS = json.dumps({t: f"cus_{t}" for t in TENANTS})


def test_stripe_meter_event_shape() -> None:
    record = UsageRecord("42", "acme", "req_1", T0, "m", 10, 5, 2, 3, None, None, None)
    assert stripe_meter_event(record, "tenantry_tokens", {"acme": "cus_A"}) == {
        "event_name": "tenantry_tokens", "identifier": "req_1",
        "timestamp": str(int(T0.timestamp())), "payload[stripe_customer_id]": "cus_A",
        "payload[value]": "20"}
    with pytest.raises(ExportRejected, match="no Stripe customer"):
        stripe_meter_event(record, "tenantry_tokens", {})


def test_stripe_exporter_killed_mid_batch_resumes_and_stripe_gets_each_event_once(
        usage_db: str) -> None:
    recent = datetime.now(UTC) - timedelta(hours=2)  # Stripe takes the last 35 days only
    ids = insert_usage(usage_db, 0, 200, created_at=recent)
    # Stripe takes one event per request: the kill lands in the middle of the 3rd batch,
    # after Stripe recorded its 21st event and before the exporter heard so.
    stand_in = StripeStandIn(STRIPE_KEY, hold_after_events=120)
    with serve(stand_in.app()) as url:
        env = exporter_env(usage_db, provider="stripe", stripe_url=url,
                           stripe_api_key=STRIPE_KEY, stripe_customers=CUSTOMERS)
        kill_midway(env, lambda: len(stand_in.accepted_ids()) > 120)
        assert exported_count(usage_db) == 100
        ids += insert_usage(usage_db, 200, 20, created_at=recent)
        stand_in.hold_after_events = None
        stand_in.release.set()
        resume_once(env)
    accepted = stand_in.accepted_ids()
    assert sorted(accepted) == sorted(ids) and len(set(accepted)) == len(accepted) == 220
    assert stand_in.duplicates == 21  # the 3rd batch's first 21, refused by identifier
    assert stand_in.rejected == []
    assert {e["payload[stripe_customer_id]"] for e in stand_in.accepted} == {
        f"cus_{t}" for t in TENANTS}
    assert exported_count(usage_db) == 220


def test_stripe_tenant_without_a_customer_stops_the_export_before_anything_moves(
        usage_db: str) -> None:
    insert_usage(usage_db, 0, 5, created_at=datetime.now(UTC))
    stand_in = StripeStandIn(STRIPE_KEY)
    with serve(stand_in.app()) as url:
        done = subprocess.run([*EXPORTER, "--once"], env=exporter_env(
            usage_db, provider="stripe", stripe_url=url, stripe_api_key=STRIPE_KEY,
            stripe_customers=json.dumps({"acme": "cus_acme"})), capture_output=True,
            timeout=120, check=False)
    assert done.returncode == 2
    assert b"has no Stripe customer" in done.stdout + done.stderr
    assert exported_count(usage_db) == 0


def test_the_tenantry_cli_exports_what_is_pending_and_says_what_is_misconfigured(
        usage_db: str) -> None:
    ids = insert_usage(usage_db, 0, 120)
    stand_in = OpenMeterStandIn()
    cli = [sys.executable, "-m", "tenantry_cli", "export"]
    with serve(stand_in.app()) as url:
        done = subprocess.run(cli, env=exporter_env(usage_db, openmeter_url=url),
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(stand_in.accepted_ids()) == sorted(ids)
        again = subprocess.run(cli, env=exporter_env(usage_db, openmeter_url=url),
                               capture_output=True, text=True, timeout=120, check=False)
        assert again.returncode == 0 and stand_in.duplicates == 0  # nothing sent twice
    # No provider address: refused before anything moves, in words (exit 6, "refused").
    unset = {k: v for k, v in exporter_env(usage_db).items()
             if k != "TENANTRY_EXPORT_OPENMETER_URL"}
    refused = subprocess.run(cli, env=unset, capture_output=True, text=True, timeout=120,
                             check=False)
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert "OPENMETER_URL" in refused.stderr.upper()
    # The database away: exit 4 (unreachable), and the next run resumes.
    away = exporter_env(usage_db, openmeter_url="http://127.0.0.1:9",
                        database_url="postgresql://nobody@127.0.0.1:9/none")
    unreachable = subprocess.run(cli, env=away, capture_output=True, text=True, timeout=120,
                                 check=False)
    assert unreachable.returncode == 4, unreachable.stdout + unreachable.stderr
