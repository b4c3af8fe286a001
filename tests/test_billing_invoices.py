"""Invoices from ai_usage_logs (real Postgres): a generated month equals an independent
recomputation, closed months are frozen and late usage becomes an adjustment, exactly once;
RLS keeps tenants apart; bridge tenants' invoices live in their own schema."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import psycopg
import pytest
from billing_helpers import generate_month, recompute, terms_for
from db_helpers import connect, create_login_role, drop_roles, scratch_database, unique
from tenantry_devenv.services import Postgres
from tenantry_operator.database import bootstrap_shared, ensure_bridge_tenant
from tenantry_runtime.billing import BillingTerms
from tenantry_runtime.billing.invoice import Invoice
from tenantry_runtime.billing.invoices import (
    MonthNotOver,
    close_invoice,
    compute_invoice,
)
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    SHARED_SCHEMA,
    bridge_role,
    bridge_schema,
    tenant_transaction,
)

pytestmark = pytest.mark.timeout(300)

MONTH = date(2026, 10, 1)
AFTER = datetime(2026, 12, 2, tzinfo=UTC)


@dataclass
class Db:
    postgres: Postgres
    name: str
    admin_dsn: str
    app_dsn: str
    roles: list[str]


@pytest.fixture(scope="module")
def db(postgres: Postgres) -> Iterator[Db]:
    login, password = unique("billapp"), secrets.token_hex(12)
    with scratch_database(postgres, "billing") as name:
        with connect(postgres, name) as conn:
            bootstrap_shared(conn)
            create_login_role(conn, login, password, APP_ROLE)
        found = Db(postgres, name, postgres.dsn(name), postgres.dsn(name, login, password),
                   [login])
        yield found
    drop_roles(postgres, found.roles)


def invoice_of(dsn: str, tenant: str, month: date, billing: dict[str, Any],
               schema: str = SHARED_SCHEMA) -> Invoice:
    with psycopg.connect(dsn, autocommit=True) as conn, tenant_transaction(conn, tenant):
        return compute_invoice(conn, schema, tenant, month, BillingTerms.from_plan(billing))


def close(dsn: str, tenant: str, month: date, billing: dict[str, Any],
          schema: str = SHARED_SCHEMA, now: datetime = AFTER) -> Invoice:
    with psycopg.connect(dsn, autocommit=True) as conn, tenant_transaction(conn, tenant):
        return close_invoice(conn, schema, tenant, month, BillingTerms.from_plan(billing), now)


def add_row(dsn: str, tenant: str, at: datetime, model: str, tokens: int, cost: str | None,
            schema: str = SHARED_SCHEMA) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, tenant_transaction(conn, tenant):
        conn.execute(f"INSERT INTO {schema}.ai_usage_logs (tenant_id, request_id, created_at,"  # noqa: S608
                     " model, input_tokens, cost, currency, price_version)"
                     " VALUES (%s, %s, %s, %s, %s, %s, 'USD', 'v1')",
                     (tenant, secrets.token_hex(6), at, model, tokens, cost))


def test_a_generated_month_equals_an_independent_recomputation(db: Db) -> None:
    tenants = [f"gen{i:03d}" for i in range(100)]
    with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
        assert generate_month(conn, SHARED_SCHEMA, tenants, MONTH, 1_000) == 100_000
    modes = set()
    for index, tenant in enumerate(tenants):
        billing = terms_for(index)
        invoice = invoice_of(db.app_dsn, tenant, MONTH, billing)
        expected = recompute(db.admin_dsn, SHARED_SCHEMA, tenant, MONTH, billing)
        modes.add(invoice.mode)
        usage = {line.model: line for line in invoice.lines if line.kind == "usage"}
        assert {m: line.requests for m, line in usage.items()} == dict(expected.requests)
        assert {m: line.tokens for m, line in usage.items()} == dict(expected.tokens)
        cost = {m: expected.cost.get(m, Fraction(0)) for m in expected.requests}
        assert {m: line.list_cost for m, line in usage.items()} == {
            m: Decimal(c.numerator) / Decimal(c.denominator) for m, c in cost.items()}
        assert {m: line.unpriced_requests for m, line in usage.items() if
                line.unpriced_requests} == dict(expected.unpriced)
        amounts = {line.model or "(overage)": line.amount for line in invoice.lines}
        assert amounts == expected.amounts, tenant
        assert invoice.allowance.overage_tokens == expected.overage_tokens
        assert invoice.total == expected.total and invoice.total > 0
        assert sum(line.amount for line in invoice.lines) == invoice.total
        assert all(line.amount == line.amount.quantize(Decimal("0.01"))
                   for line in invoice.lines)
        assert any("without a price" in note for note in invoice.notes) == (
            invoice.mode in ("usage-list", "allowance+list"))
    assert modes == {"usage-list", "allowance+overage", "usage-flat", "allowance+list"}


def test_a_closed_month_is_frozen_and_late_usage_is_billed_once_next_month(db: Db) -> None:
    tenant, billing = "latefrozen", {}
    sep, oct_, nov, dec = date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1)
    add_row(db.app_dsn, tenant, datetime(2026, 9, 10, tzinfo=UTC), "m", 1000, "1.005")
    add_row(db.app_dsn, tenant, datetime(2026, 10, 3, tzinfo=UTC), "m", 1000, "2.50")
    with pytest.raises(MonthNotOver, match="close it after that"):
        close(db.app_dsn, tenant, oct_, billing, now=datetime(2026, 10, 31, 23, tzinfo=UTC))
    first = close(db.app_dsn, tenant, sep, billing)
    assert first.status == "closed" and first.total == Decimal("1.00")  # 1.005: half to even
    # Late usage of September (e.g. replayed from a spool) after it was closed.
    add_row(db.app_dsn, tenant, datetime(2026, 9, 30, 23, 59, tzinfo=UTC), "m", 500, "0.70")
    add_row(db.app_dsn, tenant, datetime(2026, 9, 30, 23, 59, tzinfo=UTC), "n", 10, "0.30")
    # September stays as it was billed, closing again changes nothing.
    assert invoice_of(db.app_dsn, tenant, sep, billing) == first
    assert close(db.app_dsn, tenant, sep, billing) == first
    october = close(db.app_dsn, tenant, oct_, billing)
    adjustments = [line for line in october.lines if line.kind == "adjustment"]
    # m: 1.705 -> 1.70 now, 1.00 billed: +0.70; n: new, 0.30.
    assert [(a.model, a.for_month, a.requests, a.tokens, a.amount) for a in adjustments] == [
        ("m", "2026-09", 1, 500, Decimal("0.70")), ("n", "2026-09", 1, 10, Decimal("0.30"))]
    assert october.total == Decimal("2.50") + Decimal("1.00")
    # Billed once: November has no adjustment until more late rows come, then only those.
    assert not [x for x in invoice_of(db.app_dsn, tenant, nov, billing).lines
                if x.kind == "adjustment"]
    add_row(db.app_dsn, tenant, datetime(2026, 9, 2, tzinfo=UTC), "m", 1, "0.01")
    add_row(db.app_dsn, tenant, datetime(2026, 10, 31, tzinfo=UTC), "m", 1, "0.02")
    november = close(db.app_dsn, tenant, nov, billing)
    # September's m now sums to 1.715 -> 1.72 (rounded once, on the whole line); 1.70 was
    # billed, so +0.02: the rounding residue is never lost or billed twice.
    assert [(a.for_month, a.model, a.amount) for a in november.lines] == [
        ("2026-09", "m", Decimal("0.02")), ("2026-10", "m", Decimal("0.02"))]
    assert not [x for x in invoice_of(db.app_dsn, tenant, dec, billing).lines]


def test_late_usage_past_the_allowance_adjusts_the_overage(db: Db) -> None:
    tenant = "lateoverage"
    billing = {"includedMonthlyTokens": 1_000_000, "overagePricePerMillionTokens": "3.00"}
    add_row(db.app_dsn, tenant, datetime(2026, 9, 5, tzinfo=UTC), "m", 1_500_000, None)
    september = close(db.app_dsn, tenant, date(2026, 9, 1), billing)
    assert september.allowance.overage_tokens == 500_000 and september.total == Decimal("1.50")
    add_row(db.app_dsn, tenant, datetime(2026, 9, 6, tzinfo=UTC), "m", 250_000, None)
    october = invoice_of(db.app_dsn, tenant, date(2026, 10, 1), billing)
    # The plan rate of the closed month applies to its late tokens.
    assert [(a.adjusts, a.tokens, a.amount) for a in october.lines if a.model is None] == [
        ("overage", 250_000, Decimal("0.75"))]


def test_tenants_never_see_each_others_usage_or_invoices(db: Db) -> None:
    add_row(db.app_dsn, "leaka", datetime(2026, 9, 5, tzinfo=UTC), "m", 10, "5.00")
    close(db.app_dsn, "leaka", date(2026, 9, 1), {})
    # As tenant leakb, asking for leaka's invoice finds nothing of leaka's.
    with psycopg.connect(db.app_dsn, autocommit=True) as conn, \
            tenant_transaction(conn, "leakb"):
        stolen = compute_invoice(conn, SHARED_SCHEMA, "leaka", date(2026, 9, 1),
                                 BillingTerms())
        assert stolen.lines == () and stolen.status == "draft"
        assert conn.execute("SELECT count(*) FROM tenantry.billing_invoices").fetchone() == (0,)


def test_a_bridge_tenants_invoice_lives_in_its_own_schema(db: Db) -> None:
    tenant, password = "billbridge", secrets.token_hex(12)
    with connect(db.postgres, db.name) as conn:
        ensure_bridge_tenant(conn, tenant, password)
    db.roles.append(bridge_role(tenant))
    dsn = db.postgres.dsn(db.name, bridge_role(tenant), password)
    schema = bridge_schema(tenant)
    # The runtime's role meters it; the operator's admin closes its month (the CLI does).
    add_row(db.app_dsn, tenant, datetime(2026, 9, 5, tzinfo=UTC), "m", 10, "0.125", schema)
    # Its own login reads its usage and invoices but may not close (write) one.
    assert invoice_of(dsn, tenant, date(2026, 9, 1), {}, schema).total == Decimal("0.12")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        close(dsn, tenant, date(2026, 9, 1), {}, schema)
    closed = close(db.admin_dsn, tenant, date(2026, 9, 1), {}, schema)
    assert closed.total == Decimal("0.12")
    assert invoice_of(dsn, tenant, date(2026, 9, 1), {}, schema) == closed
    with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
        assert conn.execute(f"SELECT tenant_id, total FROM {schema}.billing_invoices"  # noqa: S608
                            ).fetchall() == [(tenant, Decimal("0.120000"))]
        assert conn.execute("SELECT count(*) FROM tenantry.billing_invoices"
                            " WHERE tenant_id = %s", (tenant,)).fetchone() == (0,)


def test_the_invoice_document_round_trips_exactly(db: Db) -> None:
    invoice = invoice_of(db.app_dsn, "gen001", MONTH, terms_for(1))
    again = Invoice.from_json(invoice.to_json())
    assert again == invoice
    assert all(isinstance(v, str) for v in (invoice.to_json()["total"],))
