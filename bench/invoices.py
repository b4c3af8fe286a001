"""Time producing every tenant's monthly invoice from ai_usage_logs (100 tenants x 1M rows).

A real PostgreSQL 18 (the dev server of tenantry_devenv), the shared schema bootstrapped by
the operator's code, one generated month (tests/billing_helpers.py: four models, a price
change on the 15th, unpriced rows, the four ways to bill). Times, as the runtime's login under
RLS: drafting all invoices (one GROUP BY per tenant), closing them all (insert the frozen
documents), then reading the frozen ones; then checks every invoice against the independent
recomputation (not timed). Prints figures, asserts nothing but the equality.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
from tenantry_devenv.services import start_postgres
from tenantry_operator.database import bootstrap_shared
from tenantry_runtime.billing import BillingTerms
from tenantry_runtime.billing.invoice import Invoice
from tenantry_runtime.billing.invoices import close_invoice, compute_invoice
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    SHARED_SCHEMA,
    ensure_partitions,
    tenant_transaction,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from billing_helpers import generate_month, recompute, terms_for

MONTH = date(2026, 10, 1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def all_invoices(dsn: str, tenants: list[str], action: Callable[..., Invoice]
                 ) -> tuple[float, list[float], list[Invoice]]:
    """(wall seconds, per-tenant seconds, invoices) over one connection, tenant by tenant."""
    each: list[float] = []
    out: list[Invoice] = []
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for index, tenant in enumerate(tenants):
            one = time.perf_counter()
            with tenant_transaction(conn, tenant):
                out.append(action(conn, SHARED_SCHEMA, tenant, MONTH,
                                  BillingTerms.from_plan(terms_for(index))))
            each.append(time.perf_counter() - one)
    return time.perf_counter() - started, each, out


def close_after_month(conn: Any, schema: str, tenant: str, month: date,
                      terms: BillingTerms) -> Invoice:
    return close_invoice(conn, schema, tenant, month, terms, datetime(2026, 11, 2, tzinfo=UTC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1_000_000, help="usage rows in all")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the independent recomputation (slow at 1M rows)")
    args = parser.parse_args()
    tenants = [f"bill{i:04d}" for i in range(args.tenants)]
    workdir = Path(tempfile.mkdtemp(prefix="tenantry-bench-invoices-"))
    server = start_postgres(workdir / "pg")
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE tenantry")
        admin = server.dsn("tenantry")
        login, password = "bench_billing", secrets.token_hex(12)
        with psycopg.connect(admin, autocommit=True) as conn:
            bootstrap_shared(conn)
            ensure_partitions(conn, SHARED_SCHEMA, 0, MONTH)
            conn.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{password}' IN ROLE {APP_ROLE}")
            started = time.perf_counter()
            rows = generate_month(conn, SHARED_SCHEMA, tenants, MONTH,
                                  args.rows // args.tenants)
            conn.execute("ANALYZE tenantry.ai_usage_logs")
            log(f"generated {rows} rows in {time.perf_counter() - started:.1f} s")
        app = server.dsn("tenantry", login, password)
        figures: dict[str, tuple[float, list[float]]] = {}
        drafts: list[Invoice] = []
        for name, action in (("draft (cold)", compute_invoice), ("draft (warm)", compute_invoice),
                             ("close", close_after_month), ("read closed", compute_invoice)):
            wall, each, invoices = all_invoices(app, tenants, action)
            figures[name] = (wall, each)
            drafts = drafts or invoices
            log(f"{name}: {wall:.2f} s")
        print(f"invoices: {args.tenants} tenants, {rows} usage rows in {MONTH:%Y-%m}"
              " (2 cores shared with other work; one connection, tenant by tenant)")
        print(f"{'step':<14} {'all tenants':>12} {'median/tenant':>14} {'max/tenant':>11}")
        for name, (wall, each) in figures.items():
            print(f"{name:<14} {wall:>10.2f} s {statistics.median(each) * 1000:>11.1f} ms"
                  f" {max(each) * 1000:>8.1f} ms")
        total = sum((inv.total for inv in drafts), start=drafts[0].total * 0)
        print(f"sum of all totals: {total} USD over {sum(len(i.lines) for i in drafts)} lines")
        if not args.no_verify:
            started = time.perf_counter()
            for index, (tenant, invoice) in enumerate(zip(tenants, drafts, strict=True)):
                expected = recompute(admin, SHARED_SCHEMA, tenant, MONTH, terms_for(index))
                amounts = {line.model or "(overage)": line.amount for line in invoice.lines}
                if amounts != expected.amounts or invoice.total != expected.total:
                    raise SystemExit(f"MISMATCH for {tenant}: {amounts} != {expected.amounts}")
            print(f"independent recomputation (Python, row by row, exact fractions): all "
                  f"{args.tenants} invoices equal ({time.perf_counter() - started:.1f} s)")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
