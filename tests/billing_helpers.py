"""Generated usage months and an independent invoice recomputation (tests and bench/).

The recomputation shares no code with `tenantry_runtime.billing`: it reads raw rows, prices
each one again from the price book's JSON (the version in effect at created_at, found by a
linear scan), checks the stored cost, and computes amounts with exact fractions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

import psycopg
from psycopg import sql

MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5", "claude-unpriced-x")
# Two versions: the change on the 15th at noon must not touch the rows before it.
BOOK: dict[str, Any] = {
    "currency": "USD", "unit": "per million tokens", "source": "test",
    "versions": [
        {"version": "v1", "effective_from": "2026-01-01T00:00:00+00:00", "models": {
            "claude-haiku-4-5": {"input": "1.00", "output": "5.00", "cache_write": "1.25",
                                 "cache_read": "0.10"},
            "claude-sonnet-4-5": {"input": "3.00", "output": "15.00", "cache_write": "3.75",
                                  "cache_read": "0.30"},
            "claude-opus-4-5": {"input": "5.00", "output": "25.00", "cache_write": "6.25",
                                "cache_read": "0.50"}}},
        {"version": "v2", "effective_from": "2026-10-15T12:00:00+00:00", "models": {
            "claude-haiku-4-5": {"input": "0.80", "output": "4.00", "cache_write": "1.00",
                                 "cache_read": "0.08"},
            "claude-sonnet-4-5": {"input": "3.00", "output": "15.00", "cache_write": "3.75",
                                  "cache_read": "0.30"},
            "claude-opus-4-5": {"input": "4.75", "output": "23.75", "cache_write": "5.95",
                                "cache_read": "0.475"}}},
    ]}
KINDS = ("input", "output", "cache_write", "cache_read")


def terms_for(index: int) -> dict[str, Any]:
    """The plan billing of the index-th generated tenant: the four ways in turn."""
    return [{},
            {"includedMonthlyTokens": 2_000_000, "overagePricePerMillionTokens": "2.50"},
            {"overagePricePerMillionTokens": "1.75"},
            {"includedMonthlyTokens": 1_000_000}][index % 4]


def _price_rows() -> list[tuple[Any, ...]]:
    versions = BOOK["versions"]
    rows = []
    for i, version in enumerate(versions):
        start = datetime.fromisoformat(version["effective_from"])
        end = (datetime.fromisoformat(versions[i + 1]["effective_from"])
               if i + 1 < len(versions) else datetime(9999, 1, 1, tzinfo=UTC))
        for model, price in version["models"].items():
            rows.append((version["version"], start, end, model,
                         *(Decimal(price[k]) for k in KINDS)))
    return rows


def generate_month(conn: psycopg.Connection[Any], schema: str, tenants: list[str],
                   month: date, rows_per_tenant: int, seed: float = 0.42) -> int:
    """Insert `rows_per_tenant` usage rows per tenant spread over `month`, priced at the
    version in effect at each row's time (in SQL: fast). Needs a login that bypasses RLS."""
    lower = datetime(month.year, month.month, 1, tzinfo=UTC)
    upper = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    with conn.transaction():
        conn.execute("SELECT setseed(%s)", (seed,))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS gen_prices (version text,"
                     " eff_from timestamptz, eff_to timestamptz, model text, pin numeric,"
                     " pout numeric, pcw numeric, pcr numeric) ON COMMIT DROP")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO gen_prices VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                            _price_rows())
        inserted = conn.execute(sql.SQL("""
            WITH gen AS MATERIALIZED (
                SELECT t.tenant, g,
                       %(lower)s::timestamptz
                         + (random() * extract(epoch FROM %(upper)s::timestamptz
                                                - %(lower)s::timestamptz))
                           * interval '1 second' AS at,
                       (%(models)s::text[])[1 + floor(random() * 3.98)::int] AS model,
                       floor(random() * 4000)::bigint AS i, floor(random() * 1500)::bigint AS o,
                       floor(random() * random() * 2000)::bigint AS cw,
                       floor(random() * random() * 8000)::bigint AS cr
                FROM unnest(%(tenants)s::text[]) AS t(tenant),
                     generate_series(1, %(per)s) AS g)
            INSERT INTO {} (tenant_id, request_id, created_at, model, input_tokens,
                            output_tokens, cache_creation_input_tokens,
                            cache_read_input_tokens, cost, currency, price_version, status)
            SELECT gen.tenant, 'req-' || gen.tenant || '-' || gen.g, least(gen.at,
                   %(upper)s::timestamptz - interval '1 microsecond'), gen.model,
                   gen.i, gen.o, gen.cw, gen.cr,
                   (gen.i * p.pin + gen.o * p.pout + gen.cw * p.pcw + gen.cr * p.pcr)
                     / 1000000,
                   CASE WHEN p.model IS NULL THEN NULL ELSE 'USD' END, p.version, 200
            FROM gen LEFT JOIN gen_prices p
              ON p.model = gen.model AND gen.at >= p.eff_from AND gen.at < p.eff_to
        """).format(sql.Identifier(schema, "ai_usage_logs")),
            {"lower": lower, "upper": upper, "models": list(MODELS), "tenants": tenants,
             "per": rows_per_tenant}).rowcount
    return inserted


def _half_even(value: Fraction) -> Decimal:
    """Round an exact fraction to cents, half to even."""
    cents = value * 100
    floor = cents.numerator // cents.denominator
    rest = cents - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2):
        floor += 1
    return Decimal(floor).scaleb(-2).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)


@dataclass
class Expected:
    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cost: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    unpriced: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    amounts: dict[str, Decimal] = field(default_factory=dict)
    overage_tokens: int = 0
    total: Decimal = Decimal(0)


def _version_at(at: datetime) -> dict[str, Any] | None:
    found = None
    for version in BOOK["versions"]:
        if datetime.fromisoformat(version["effective_from"]) <= at:
            found = version
    return found


def recompute(dsn: str, schema: str, tenant: str, month: date,
              billing: dict[str, Any]) -> Expected:
    """The invoice's figures from the raw rows, independently (admin DSN: reads as superuser)."""
    lower = datetime(month.year, month.month, 1, tzinfo=UTC)
    upper = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    out = Expected()
    with psycopg.connect(dsn) as conn, conn.cursor(name="rows") as cur:
        cur.execute(sql.SQL(
            "SELECT created_at, model, input_tokens, output_tokens,"
            " cache_creation_input_tokens, cache_read_input_tokens, cost, price_version"
            " FROM {} WHERE tenant_id = %s AND created_at >= %s AND created_at < %s").format(
            sql.Identifier(schema, "ai_usage_logs")), (tenant, lower, upper))
        for at, model, i, o, cw, cr, cost, version_name in cur:
            out.requests[model] += 1
            out.tokens[model] += i + o + cw + cr
            version = _version_at(at)
            price = None if version is None else version["models"].get(model)
            if price is None:
                assert cost is None
                out.unpriced[model] += 1
                continue
            again = sum((Fraction(n) * Fraction(price[k]) for n, k in zip(
                (i, o, cw, cr), KINDS, strict=True)), Fraction(0)) / 1_000_000
            # The stored cost is the price in effect then, never a later one.
            assert Fraction(cost) == again and version_name == version["version"], (at, model)
            out.cost[model] += again
    included = int(billing.get("includedMonthlyTokens", 0))
    rate = Fraction(billing.get("overagePricePerMillionTokens", "0"))
    total_tokens = sum(out.tokens.values())
    out.overage_tokens = max(0, total_tokens - included)
    if rate:
        out.amounts = {m: Decimal("0.00") for m in out.requests}
        overage = _half_even(out.overage_tokens * rate / 1_000_000)
        out.total = sum(out.amounts.values(), overage)
        if out.overage_tokens:
            out.amounts["(overage)"] = overage
    else:
        out.amounts = {m: _half_even(out.cost[m] * out.overage_tokens / total_tokens)
                       for m in out.requests}
        out.total = sum(out.amounts.values(), Decimal("0.00"))
    return out


def book_json() -> str:
    return json.dumps(BOOK)
