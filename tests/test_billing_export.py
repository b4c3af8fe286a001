"""Usage export to OpenMeter (issue 10): payloads, retries, checkpoints, and a crash midway.

Real parts: the embedded Postgres (a scratch database migrated like the shared one), the
exporter as a subprocess (`python -m tenantry_runtime.export`), and an OpenMeter stand-in
under uvicorn that validates every request and deduplicates on (source, id) as OpenMeter does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from billing_helpers import OpenMeterStandIn, cloudevent_problems
from db_helpers import scratch_database
from pydantic import SecretStr
from runtime_helpers import serve, wait_for
from tenantry_devenv.services import Postgres
from tenantry_runtime.contracts.database import migrate
from tenantry_runtime.export import (
    ExportRejected,
    ExportSettings,
    OpenMeterSink,
    UsageExporter,
    UsageRecord,
    cloud_event,
    read_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
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
                 created_at: datetime = T0) -> list[str]:
    """`count` usage rows spread over tenants and several transactions; their request ids."""
    ids = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(first, first + count, per_transaction):
            rows = []
            for n in range(start, min(start + per_transaction, first + count)):
                request_id = f"req_{n:06d}"
                ids.append(request_id)
                rows.append((TENANTS[n % 3], request_id, created_at + timedelta(seconds=n),
                             "claude-sonnet-4-5", 100 + n, 20, n % 2, 0,
                             Decimal("0.000123") * n, "USD", "2026-11-01"))
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at,"
                    " model, input_tokens, output_tokens, cache_creation_input_tokens,"
                    " cache_read_input_tokens, cost, currency, price_version)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
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


def test_exporter_killed_midway_resumes_and_the_provider_gets_every_event_once(
        usage_db: str) -> None:
    ids = insert_usage(usage_db, 0, 500)
    # After 3 acknowledged batches the 4th is recorded but its acknowledgement held: the kill
    # lands between the provider taking a batch and the checkpoint moving, the worst moment.
    stand_in = OpenMeterStandIn(hold_after_batches=3)
    env = {**os.environ, "TENANTRY_EXPORT_DATABASE_URL": usage_db,
           "TENANTRY_EXPORT_BATCH_SIZE": "50", "TENANTRY_EXPORT_INTERVAL_SECONDS": "0.05",
           "TENANTRY_EXPORT_BACKOFF_SECONDS": "0.01",
           # This checkout's packages, whatever the venv has installed.
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "runtime"),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "tenantry_runtime.export"]
    with serve(stand_in.app()) as url:
        env["TENANTRY_EXPORT_OPENMETER_URL"] = url
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: stand_in.batches >= 4 or first.poll() is not None, 60,
                     "the exporter to send 4 batches")
            assert first.poll() is None, first.communicate()[0].decode()
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        with psycopg.connect(usage_db, autocommit=True) as conn:
            checkpoint = read_checkpoint(conn, "openmeter", SCHEMA)
            exported = conn.execute("SELECT exported FROM tenantry_private."
                                    "usage_export_checkpoints").fetchone()
        assert exported == (150,)  # three acknowledged batches, not the held one
        assert checkpoint[0] != "0"
        assert len(stand_in.accepted_ids()) == 200  # the provider has the 4th batch already
        # Usage keeps arriving while the exporter is down.
        ids += insert_usage(usage_db, 500, 40)
        stand_in.hold_after_batches = None
        stand_in.release.set()
        second = subprocess.run([*command, "--once"], env=env, capture_output=True,
                                timeout=120, check=False)
        assert second.returncode == 0, second.stdout.decode() + second.stderr.decode()
    accepted = stand_in.accepted_ids()
    assert sorted(accepted) == sorted(ids)  # every event, once, nothing skipped
    assert len(set(accepted)) == len(accepted) == 540
    assert stand_in.duplicates == 50  # the held batch was resent and dropped by id
    assert stand_in.rejected == []
    with psycopg.connect(usage_db, autocommit=True) as conn:
        assert conn.execute("SELECT exported FROM tenantry_private.usage_export_checkpoints"
                            ).fetchone() == (540,)
