"""The `tenantry` admin CLI against the real control plane (in-process operator), the shared
Postgres and Redis: usage, invoices, keys, tenants, doctor, exit codes."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import redis
from conftest import RUNTIME_NAMESPACE
from kube_helpers import apply_tenant, delete_tenant, get_json, wait_for, wait_ready
from tenantry_cli.main import main
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import tenant_transaction
from tenantry_runtime.contracts.redis_keys import DOCUMENT_OWNERS

pytestmark = [pytest.mark.usefixtures("operator"), pytest.mark.timeout(300)]

TENANT = "clibill"
NOW = datetime.now(UTC)
THIS_MONTH = NOW.date().replace(day=1)
LAST_MONTH = (THIS_MONTH - timedelta(days=1)).replace(day=1)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def insert(dsn: str, tenant: str, at: datetime, model: str, tokens: int, cost: str | None,
           key: str = "web") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at,"
                     " model, input_tokens, output_tokens, cost, currency, price_version,"
                     " api_key_name) VALUES (%s, %s, %s, %s, %s, %s, %s, 'USD', 'test', %s)",
                     (tenant, f"r-{at.timestamp()}-{model}-{tokens}", at, model, tokens,
                      tokens, cost, key))


@pytest.fixture(scope="module")
def tenant(control_plane: ControlPlane, shared_database: str) -> Iterator[str]:
    expired = (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    apply_tenant(control_plane, TENANT, plan="pro",
                 apiKeys=[{"name": "web"}, {"name": "old", "expiresAt": expired}])
    wait_ready(control_plane, TENANT, timeout=120)
    wait_for("runtime record", lambda: get_json(
        control_plane, "secret", runtime_record.secret_name(TENANT), "-n", RUNTIME_NAMESPACE))
    first = datetime.combine(LAST_MONTH, datetime.min.time(), tzinfo=UTC)
    insert(shared_database, TENANT, first + timedelta(days=2), "claude-sonnet-4-5", 1000,
           "0.018")
    insert(shared_database, TENANT, first + timedelta(days=3), "claude-haiku-4-5", 500, "0.003")
    insert(shared_database, TENANT, NOW - timedelta(minutes=1), "claude-sonnet-4-5", 100,
           "0.0018")
    # Another tenant's rows never show up in this tenant's figures.
    insert(shared_database, "clibillother", first + timedelta(days=2), "claude-sonnet-4-5",
           99_999, "9.99")
    yield TENANT
    delete_tenant(control_plane, TENANT)


def test_usage_by_model_as_json_csv_and_table(capsys: pytest.CaptureFixture[str],
                                              tenant: str) -> None:
    last_day = THIS_MONTH - timedelta(days=1)
    window = ("--from", LAST_MONTH.isoformat(), "--to", last_day.isoformat())
    code, out, _ = run(capsys, "usage", "--tenant", tenant, *window, "--by", "model",
                       "--output", "json")
    assert code == 0
    data = json.loads(out)
    assert data["tenant"] == tenant and data["by"] == "model"
    assert [(r["model"], r["requests"], r["input_tokens"], r["cost"]) for r in data["data"]] == [
        ("claude-haiku-4-5", 1, 500, "0.003"), ("claude-sonnet-4-5", 1, 1000, "0.018")]
    code, out, _ = run(capsys, "usage", "--tenant", tenant, *window, "--by", "day",
                       "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["date"] for r in rows] == [
        (LAST_MONTH + timedelta(days=2)).isoformat(), (LAST_MONTH + timedelta(days=3)).isoformat()]
    assert "model" not in rows[0]
    code, out, _ = run(capsys, "usage", "--tenant", tenant, *window)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["DATE", "MODEL", "REQUESTS"]
    assert "99999" not in out


def test_invoice_draft_close_frozen_and_refusals(capsys: pytest.CaptureFixture[str],
                                                 tenant: str) -> None:
    month = LAST_MONTH.strftime("%Y-%m")
    code, out, _ = run(capsys, "invoice", "--tenant", tenant, "--month", month, "-o", "json")
    draft = json.loads(out)
    # pro: 40M tokens included at 3.00 per million beyond: 3000 tokens are within.
    assert code == 0 and draft["status"] == "draft" and draft["mode"] == "allowance+overage"
    assert draft["allowance"]["consumed_tokens"] == 3000 and draft["total"] == "0.00"
    assert [(x["model"], x["requests"]) for x in draft["lines"]] == [
        ("claude-haiku-4-5", 1), ("claude-sonnet-4-5", 1)]
    code, out, _ = run(capsys, "invoice", "--tenant", tenant, "--month", month, "--close",
                       "-o", "json")
    closed = json.loads(out)
    assert code == 0 and closed["status"] == "closed" and closed["closed_at"]
    code, out, _ = run(capsys, "invoice", "--tenant", tenant, "--month", month, "--close",
                       "-o", "json")
    assert json.loads(out) == closed  # idempotent: the frozen invoice comes back
    code, out, _ = run(capsys, "invoice", "--tenant", tenant, "--month", month)
    assert code == 0 and "(closed, closed " in out and "TOTAL 0.00 USD" in out
    code, out, _ = run(capsys, "invoice", "--all", "--month", month, "-o", "json")
    assert code == 0 and next(i for i in json.loads(out) if i["tenant"] == tenant) == closed
    code, _, err = run(capsys, "invoice", "--tenant", tenant,
                       "--month", THIS_MONTH.strftime("%Y-%m"), "--close")
    assert code == 6 and "close it after that" in err
    code, _, err = run(capsys, "invoice", "--tenant", tenant, "--month", "2026-13")
    assert code == 2 and "YYYY-MM" in err
    code, _, err = run(capsys, "invoice", "--tenant", "nosuchtenant", "--month", month)
    assert code == 3 and "not found" in err


def test_keys_list_shows_metadata_and_last_use_never_a_key(
        capsys: pytest.CaptureFixture[str], control_plane: ControlPlane, tenant: str) -> None:
    code, out, _ = run(capsys, "keys", "list", "--tenant", tenant, "-o", "json")
    assert code == 0
    keys = {k["name"]: k for k in json.loads(out)["keys"]}
    assert set(keys) == {"web", "old"}
    assert keys["old"]["state"] == "expired" and keys["web"]["state"] == "active"
    assert keys["web"]["last_used"] is not None and keys["old"]["last_used"] is None
    # Issued by the operator's reconcile of this module's tenant, minutes ago at most.
    created = datetime.fromisoformat(keys["web"]["created"])
    assert NOW - timedelta(minutes=10) < created <= datetime.now(UTC)
    secret = get_json(control_plane, "secret", "tenantry-api-keys", "-n", f"tenant-{tenant}")
    assert secret is not None
    plaintext = [base64.b64decode(v).decode() for v in secret["data"].values()]
    code, table, _ = run(capsys, "keys", "list", "--tenant", tenant)
    for key in plaintext:
        prefix, secret_part = key[:len("sk-tnt-") + 12], key[len("sk-tnt-") + 13:]
        assert f"{prefix}-..." in out and f"{prefix}-..." in table
        assert secret_part not in out and secret_part not in table


def test_tenants_lists_status_and_this_months_usage(capsys: pytest.CaptureFixture[str],
                                                    tenant: str) -> None:
    code, out, _ = run(capsys, "tenants", "-o", "json")
    assert code == 0
    mine = next(t for t in json.loads(out)["tenants"] if t["name"] == tenant)
    assert (mine["plan"], mine["phase"], mine["ready"]) == ("pro", "Ready", "True")
    assert (mine["requests"], mine["tokens"], mine["list_cost"]) == (1, 200, "0.0018")
    code, out, _ = run(capsys, "tenants")
    assert code == 0 and any(line.startswith(tenant) for line in out.splitlines())


def test_doctor_passes_on_a_working_installation(capsys: pytest.CaptureFixture[str],
                                                 tenant: str) -> None:
    code, out, _ = run(capsys, "doctor", "-o", "json")
    report = json.loads(out)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert code == 0 and report["ok"] and not failed, failed
    names = {c["name"] for c in report["checks"]}
    assert {"kubernetes", "crd tenants.tenantry.dev", "postgres", "migrations", "redis",
            "price table", "plan pro"} <= names


def test_documents_backfill_registers_a_tenants_older_documents(
        capsys: pytest.CaptureFixture[str], shared_database: str, redis_server: RedisServer,
        tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    older = str(uuid.uuid4())
    with psycopg.connect(shared_database, autocommit=True) as conn, \
            tenant_transaction(conn, tenant):
        conn.execute("INSERT INTO tenantry.documents (id, tenant_id, content) VALUES"
                     " (%s, %s, 'created before the registry')", (older, tenant))
    code, out, _ = run(capsys, "documents", "backfill", "--tenant", tenant, "-o", "json")
    assert code == 0
    (row,) = json.loads(out)["tenants"]
    assert row["tenant"] == tenant and row["registered"] >= 1 and row["problem"] is None
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.hget(DOCUMENT_OWNERS, older) == tenant.encode()
    finally:
        client.close()
    code, out, _ = run(capsys, "documents", "backfill", "--tenant", tenant)
    assert code == 0 and out.splitlines()[0].split() == [
        "TENANT", "DOCUMENTS", "REGISTERED", "DROPPED", "PROBLEM"]
    assert out.splitlines()[1].split()[:4] == [tenant, str(row["documents"]), "0", "0"]
    code, _, err = run(capsys, "documents", "backfill", "--tenant", "nosuchtenant")
    assert code == 3 and "not found" in err
    monkeypatch.delenv("TENANTRY_REDIS_URL")
    code, _, err = run(capsys, "documents", "backfill", "--tenant", tenant)
    assert code == 4 and "TENANTRY_REDIS_URL is not set" in err and "fix:" in err


def test_doctor_says_what_is_wrong_and_how_to_fix_it(tmp_path: Path) -> None:
    """The console entry point in a fresh process: broken settings, plain words, exit 5."""
    prices = tmp_path / "prices.json"
    prices.write_text('{"currency": "USD", "versions": []}')
    env = {**os.environ, "TENANTRY_DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/none",
           "TENANTRY_RUNTIME_NAMESPACE": "no-such-namespace",
           "TENANTRY_RUNTIME_PRICE_TABLE": str(prices)}
    env.pop("TENANTRY_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "tenantry_cli", "doctor"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 5, done.stderr
    out = done.stdout
    assert "[FAIL] postgres: cannot connect to" in out and "pw" not in out
    assert "fix: check host, port, user and password in TENANTRY_DATABASE_URL" in out
    assert "[FAIL] redis: TENANTRY_REDIS_URL is not set" in out
    assert "[FAIL] runtime namespace: namespace 'no-such-namespace' does not exist" in out
    assert "[ok]   kubernetes" in out
    assert f"[FAIL] price table: {prices} does not load" in out
    env["KUBECONFIG"] = str(tmp_path / "missing")
    done = subprocess.run([sys.executable, "-m", "tenantry_cli", "tenants"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 4 and "fix:" in done.stderr, done.stderr


def test_help_teaches_with_examples_and_exit_codes() -> None:
    done = subprocess.run([sys.executable, "-m", "tenantry_cli", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert "exit codes:" in done.stdout and "tenantry invoice --tenant acme" in done.stdout
