"""Invoices from `ai_usage_logs` in SQL: aggregate per model in the database, price in Python.

Every function takes a connection already inside `tenant_transaction(conn, tenant)` (RLS on
the tenant) and the schema where the tenant's usage lives; the statements name the tenant too.
The month's usage is summed by Postgres (one GROUP BY per tenant), so an invoice costs one
index range scan, whatever the row count.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from ..contracts.database import validate_identifier, validate_tenant_id
from .invoice import (
    Invoice,
    InvoiceError,
    InvoiceLine,
    ModelUsage,
    adjustment_lines,
    build_invoice,
    charge_lines,
    month_bounds,
    next_month,
)
from .terms import BillingTerms

Conn = psycopg.Connection[Any]

_SUMS = sql.SQL("""count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
           coalesce(sum(cache_creation_input_tokens), 0),
           coalesce(sum(cache_read_input_tokens), 0), coalesce(sum(cost), 0),
           count(*) - count(cost), min(currency), max(currency)""")


def _table(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(validate_identifier(schema), name)


def _model_usage(model: str, row: tuple[Any, ...]) -> ModelUsage:
    requests, inputs, outputs, writes, reads, cost, unpriced, low, high = row
    if low != high:
        raise InvoiceError(f"usage of {model} was priced in {low} and {high}")
    return ModelUsage(model=model, requests=int(requests), input_tokens=int(inputs),
                      output_tokens=int(outputs), cache_creation_input_tokens=int(writes),
                      cache_read_input_tokens=int(reads), list_cost=Decimal(cost),
                      currency=high, unpriced_requests=int(unpriced))


def month_usage(conn: Conn, schema: str, tenant: str, month: date) -> list[ModelUsage]:
    """The tenant's usage in `month`, one aggregate per model."""
    lower, upper = month_bounds(month)
    rows = conn.execute(sql.SQL(
        "SELECT model, {} FROM {} WHERE tenant_id = %s"
        " AND created_at >= %s AND created_at < %s GROUP BY model ORDER BY model").format(
        _SUMS, _table(schema, "ai_usage_logs")),
        (validate_tenant_id(tenant), lower, upper)).fetchall()
    return [_model_usage(row[0], row[1:]) for row in rows]


def _months_usage(conn: Conn, schema: str, tenant: str, months: list[date]
                  ) -> dict[date, list[ModelUsage]]:
    """Usage per model of each of `months` (earlier closed months), in one statement."""
    if not months:
        return {}
    lower, upper = month_bounds(min(months))[0], month_bounds(max(months))[1]
    rows = conn.execute(sql.SQL(
        "SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date, model, {}"
        " FROM {} WHERE tenant_id = %s"
        " AND created_at >= %s AND created_at < %s GROUP BY 1, 2 ORDER BY 1, 2").format(
        _SUMS, _table(schema, "ai_usage_logs")), (tenant, lower, upper)).fetchall()
    found: dict[date, list[ModelUsage]] = {m: [] for m in months}
    for month, model, *sums in rows:
        if month in found:
            found[month].append(_model_usage(model, tuple(sums)))
    return found


def closed_invoices(conn: Conn, schema: str, tenant: str) -> dict[date, Invoice]:
    rows = conn.execute(sql.SQL(
        "SELECT month, document FROM {} WHERE tenant_id = %s ORDER BY month").format(
        _table(schema, "billing_invoices")), (validate_tenant_id(tenant),)).fetchall()
    return {month: Invoice.from_json(document) for month, document in rows}


def _terms_of(invoice: Invoice) -> BillingTerms:
    """The terms a closed invoice was computed with (its month is adjusted on them)."""
    return BillingTerms(included_tokens=invoice.allowance.included_tokens,
                        overage_per_million=invoice.overage_rate_per_million,
                        currency=invoice.currency)


def _adjustments(conn: Conn, schema: str, tenant: str, month: date,
                 closed: dict[date, Invoice]) -> list[InvoiceLine]:
    earlier = sorted(m for m in closed if m < month)
    now = _months_usage(conn, schema, tenant, earlier)
    out: list[InvoiceLine] = []
    for past in earlier:
        frozen = closed[past]
        label = past.strftime("%Y-%m")
        billed = [*frozen.charge_lines(),
                  *(line for other, invoice in closed.items() if other != month
                    for line in invoice.lines
                    if line.kind == "adjustment" and line.for_month == label)]
        recomputed, _, _ = charge_lines(now[past], _terms_of(frozen))
        out += adjustment_lines(past, recomputed, billed)
    return out


def compute_invoice(conn: Conn, schema: str, tenant: str, month: date,
                    terms: BillingTerms) -> Invoice:
    """The frozen invoice of a closed month, else the month's draft (with adjustments)."""
    closed = closed_invoices(conn, schema, tenant)
    if month in closed:
        return closed[month]
    return build_invoice(tenant, month, month_usage(conn, schema, tenant, month), terms,
                         _adjustments(conn, schema, tenant, month, closed))


class MonthNotOver(InvoiceError):
    """A month can be closed only once it has ended."""


def close_invoice(conn: Conn, schema: str, tenant: str, month: date, terms: BillingTerms,
                  now: datetime | None = None) -> Invoice:
    """Freeze the invoice of an ended month; closing again returns the stored one unchanged.

    Closers are serialised by a table lock on the invoices (SHARE ROW EXCLUSIVE conflicts with
    itself, not with readers), so two of them never bill the same late usage twice; the first
    insert wins, later ones read it back. Not an advisory lock: any login can take one with a
    key it computes, and a bridge tenant's login, which may only SELECT these tables, can take
    no lock on them that would block this one.
    """
    now = now or datetime.now(UTC)
    if now < month_bounds(month)[1]:
        raise MonthNotOver(f"{month:%Y-%m} ends at {next_month(month)} 00:00 UTC; "
                           "close it after that")
    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
        _table(schema, "billing_invoices")))
    invoice = compute_invoice(conn, schema, tenant, month, terms)
    if invoice.status == "closed":
        return invoice
    frozen = Invoice.from_json({**invoice.to_json(), "status": "closed",
                                "closed_at": now.isoformat()})
    conn.execute(sql.SQL(
        "INSERT INTO {} (tenant_id, month, currency, total, document, closed_at)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, month) DO NOTHING").format(
        _table(schema, "billing_invoices")),
        (tenant, month, frozen.currency, frozen.total, json.dumps(frozen.to_json()), now))
    return closed_invoices(conn, schema, tenant)[month]
