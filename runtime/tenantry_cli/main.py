"""`tenantry`: the admin CLI. Run `tenantry --help`, `tenantry <command> --help`.

Exit codes (scripts can rely on them): 0 done; 1 unexpected error (a bug: report it);
2 wrong arguments; 3 not found (tenant, plan, runtime record); 4 a dependency is unreachable
or not configured (Kubernetes, Postgres, Redis); 5 `doctor` found problems; 6 refused (e.g.
closing a month that has not ended, usage priced in another currency than the plan bills in).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from tenantry_runtime.billing.invoice import Invoice, InvoiceError, parse_month
from tenantry_runtime.billing.invoices import close_invoice, compute_invoice, month_usage
from tenantry_runtime.contracts.database import validate_identifier
from tenantry_runtime.errors import ApiError
from tenantry_runtime.usage import read_usage, usage_window

from . import doctor, documents
from .output import Progress, table, to_csv, to_json
from .sources import NOT_FOUND, REFUSED, UNREACHABLE, CliError, Sources, TenantView

EXIT_CODES = """exit codes:
  0  done                         4  Kubernetes/Postgres/Redis unreachable or not configured
  1  unexpected error (a bug)     5  doctor found problems
  2  wrong arguments              6  refused (e.g. closing a month that has not ended)
  3  not found (tenant, plan, runtime record)"""

# (document for --output json, rows and columns for table and csv)
Listing = tuple[Any, list[dict[str, Any]], list[str]]

ENVIRONMENT = """environment (the operator's own variables, so one setup serves both):
  KUBECONFIG                   the cluster (in a Pod: its service account)
  TENANTRY_DATABASE_URL        shared Postgres DSN (pool and bridge tenants' usage, invoices)
  TENANTRY_RUNTIME_NAMESPACE   where the runtime records live (default tenantry-system)
  TENANTRY_SILO_DSN_OVERRIDES  JSON {tenant: DSN} for silo databases outside the cluster
  TENANTRY_REDIS_URL           Redis (doctor; documents backfill)"""


def _window(args: argparse.Namespace) -> Any:
    try:
        return usage_window(args.start, args.end, datetime.now(UTC).date())
    except ApiError as error:
        raise CliError(error.message, 2) from None


def cmd_usage(src: Sources, args: argparse.Namespace) -> Listing:
    view = src.tenant(args.tenant)
    window = _window(args)
    try:
        rows = read_usage(src.dsn(view), _record(view), window)
    except psycopg.OperationalError as error:
        raise CliError(f"database of {view.name} unreachable: {str(error).strip()}",
                       UNREACHABLE) from None
    if args.by:
        rows = _regroup(rows, "date" if args.by == "day" else "model")
    columns = [c for c in ("date", "model") if not args.by or c == (
        "date" if args.by == "day" else "model")]
    columns += ["requests", "input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens", "cost", "currency", "unpriced_requests"]
    document = {"tenant": view.name, "from": window.first.isoformat(),
                "to": window.last.isoformat(), "by": args.by or "day,model", "data": rows}
    return document, rows, columns


def _record(view: TenantView) -> Any:
    if view.record is None:
        raise CliError(f"tenant {view.name}: {view.problem}", NOT_FOUND)
    return view.record


def _regroup(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sum the day x model rows by one of them; cost stays exact (decimal strings)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        into = out.setdefault(row[key], {key: row[key], "requests": 0, "input_tokens": 0,
                                         "output_tokens": 0, "cache_creation_input_tokens": 0,
                                         "cache_read_input_tokens": 0, "cost": Decimal(0),
                                         "currency": row["currency"], "unpriced_requests": 0})
        for name in ("requests", "input_tokens", "output_tokens", "cache_creation_input_tokens",
                     "cache_read_input_tokens", "unpriced_requests"):
            into[name] += row[name]
        into["cost"] += Decimal(row["cost"])
        into["currency"] = into["currency"] or row["currency"]
    for row in out.values():
        row["cost"] = f"{row['cost'].normalize():f}" if row["cost"] else "0"
    return [out[k] for k in sorted(out)]


def _invoice(src: Sources, name: str, month: date, close: bool) -> Invoice:
    view = src.tenant(name)
    if view.terms is None:
        raise CliError(f"tenant {name}: {view.problem}", NOT_FOUND)
    terms = view.terms
    with src.tenant_connection(view) as conn:
        try:
            if close:
                return close_invoice(conn, view.schema, name, month, terms)
            return compute_invoice(conn, view.schema, name, month, terms)
        except InvoiceError as error:
            raise CliError(f"tenant {name}: {error}", REFUSED) from None


def render_invoice(invoice: Invoice) -> str:
    head = (f"Invoice {invoice.tenant} {invoice.month} ({invoice.status}"
            f"{', closed ' + invoice.closed_at if invoice.closed_at else ''}) - "
            f"{invoice.mode}, {invoice.currency}")
    rows = [{"kind": line.kind, "model": line.model or "",
             "for_month": line.for_month or "", "requests": line.requests,
             "tokens": line.tokens, "list_cost": line.list_cost.normalize()
             if line.list_cost else Decimal(0), "amount": line.amount}
            for line in invoice.lines]
    allowance = invoice.allowance
    parts = [head, "", table(rows, ["kind", "model", "for_month", "requests", "tokens",
                                    "list_cost", "amount"]), "",
             f"allowance: {allowance.consumed_tokens} of {allowance.included_tokens} "
             f"included tokens used; overage {allowance.overage_tokens} tokens"
             + (f" at {invoice.overage_rate_per_million:f} per million"
                if invoice.overage_rate_per_million else ""),
             f"TOTAL {invoice.total:f} {invoice.currency}"]
    parts += [f"note: {note}" for note in invoice.notes]
    return "\n".join(parts)


def cmd_invoice(src: Sources, args: argparse.Namespace) -> int:
    try:
        month = parse_month(args.month)
    except ValueError as error:
        raise CliError(f"--month: {error}", 2) from None
    names = src.tenant_names() if args.all else [args.tenant]
    invoices: list[Invoice] = []
    failures: list[CliError] = []
    for name in Progress("invoices", len(names)).over(names):
        try:
            invoices.append(_invoice(src, name, month, args.close))
        except CliError as error:
            if not args.all:
                raise
            failures.append(error)
            print(f"tenantry: {error}", file=sys.stderr)
    if args.output == "json":
        documents = [i.to_json() for i in invoices]
        print(to_json(documents if args.all else documents[0]))
    elif args.output == "csv":
        raise CliError("invoice has no csv form; use --output table or json", 2)
    else:
        print("\n\n".join(render_invoice(i) for i in invoices))
    return max((f.code for f in failures), default=0)


def _last_used(src: Sources, view: TenantView) -> dict[str, datetime]:
    """Newest metered request per key name (rows arrive seconds after the request)."""
    if view.record is None:
        return {}
    with src.tenant_connection(view) as conn:
        rows = conn.execute(sql.SQL(
            "SELECT api_key_name, max(created_at) FROM {} WHERE tenant_id = %s"
            " AND api_key_name IS NOT NULL GROUP BY 1").format(
            sql.Identifier(validate_identifier(view.schema), "ai_usage_logs")),
            (view.name,)).fetchall()
    return {str(name): at for name, at in rows}


def cmd_keys(src: Sources, args: argparse.Namespace) -> Listing:
    view = src.tenant(args.tenant)
    record = _record(view)
    declared = {k.get("name"): k for k in view.spec.get("apiKeys") or []}
    used = _last_used(src, view)
    now = datetime.now(UTC)
    def created(name: str, prefix: str) -> str | None:
        seen = view.keys_issued.get(name)
        same = isinstance(seen, dict) and seen.get("prefix") == prefix
        return str(seen["at"]) if same and isinstance(seen, dict) else None

    rows = [{"name": key.name, "prefix": f"sk-tnt-{key.prefix}-...",
             "created": created(key.name, key.prefix),
             "expires_at": key.expires_at.isoformat() if key.expires_at else None,
             "state": "expired" if key.expires_at and key.expires_at <= now else "active",
             "last_used": used[key.name].isoformat() if key.name in used else None,
             "declared": key.name in declared}
            for key in sorted(record.api_keys, key=lambda k: k.name)]
    return {"tenant": view.name, "keys": rows}, rows, [
        "name", "prefix", "state", "created", "expires_at", "last_used"]


def cmd_tenants(src: Sources, args: argparse.Namespace
                ) -> Listing:
    month = datetime.now(UTC).date().replace(day=1)
    rows: list[dict[str, Any]] = []
    names = src.tenant_names()
    for name in Progress("tenants", len(names)).over(names):
        view = src.tenant(name)
        conditions = {c.get("type"): c.get("status") for c in view.status.get("conditions", [])}
        row: dict[str, Any] = {
            "name": name, "plan": (view.spec.get("planRef") or {}).get("name"),
            "isolation": view.spec.get("isolation", "pool"),
            "phase": view.status.get("phase"), "ready": conditions.get("Ready"),
            "requests": None, "tokens": None, "list_cost": None, "problem": view.problem}
        if view.record is not None:
            try:
                with src.tenant_connection(view) as conn:
                    usage = month_usage(conn, view.schema, name, month)
                row.update(requests=sum(u.requests for u in usage),
                           tokens=sum(u.tokens for u in usage),
                           list_cost=sum((u.list_cost for u in usage), Decimal(0)).normalize())
            except (CliError, psycopg.Error) as error:
                row["problem"] = str(error).splitlines()[0]
        rows.append(row)
    document = {"month": month.strftime("%Y-%m"), "tenants": rows}
    return document, rows, ["name", "plan", "isolation", "phase", "ready", "requests",
                            "tokens", "list_cost", "problem"]


def cmd_documents(src: Sources, args: argparse.Namespace) -> Listing:
    rows = documents.backfill(src, src.tenant_names() if args.all else [args.tenant])
    return {"tenants": rows}, rows, ["tenant", "documents", "registered", "dropped", "problem"]


def _print(args: argparse.Namespace, document: Any, rows: list[dict[str, Any]],
           columns: list[str]) -> None:
    if args.output == "json":
        print(to_json(document))
    elif args.output == "csv":
        print(to_csv(rows, columns))
    else:
        print(table(rows, columns))


def parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    root = argparse.ArgumentParser(
        prog="tenantry", formatter_class=formatter,
        description="Admin tool of a Tenantry installation: usage, invoices, API keys, "
                    "tenant status, and a doctor that says what is misconfigured.",
        epilog=f"{ENVIRONMENT}\n\n{EXIT_CODES}\n\nExamples:\n"
               "  tenantry doctor\n  tenantry tenants\n"
               "  tenantry usage --tenant acme --from 2026-11-01 --to 2026-11-30 --by model\n"
               "  tenantry invoice --tenant acme --month 2026-11\n"
               "  tenantry invoice --all --month 2026-10 --close --output json\n"
               "  tenantry keys list --tenant acme")

    def output_options(p: argparse.ArgumentParser, choices: Sequence[str]) -> None:
        p.add_argument("-o", "--output", "--format", dest="output", choices=choices,
                       default="table", help="table for people (default), json/csv for "
                       "scripts; amounts are exact decimal strings")

    def tenant_or_all(p: argparse.ArgumentParser, all_help: str) -> None:
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--tenant", help="the Tenant's name")
        which.add_argument("--all", action="store_true", help=all_help)

    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    usage = commands.add_parser(
        "usage", formatter_class=formatter, help="a tenant's usage by day and/or model",
        description="A tenant's metered usage (ai_usage_logs) in whole UTC days, with the "
                    "exact cost each request was priced at when it was made.",
        epilog="Example: tenantry usage --tenant acme --from 2026-11-01 --by model -o csv")
    usage.add_argument("--tenant", required=True, help="the Tenant's name")
    usage.add_argument("--from", dest="start", metavar="YYYY-MM-DD",
                       help="first day (default: 30 days before --to)")
    usage.add_argument("--to", dest="end", metavar="YYYY-MM-DD",
                       help="last day, inclusive (default: today, UTC)")
    usage.add_argument("--by", choices=("day", "model"),
                       help="one row per day or per model (default: per day and model)")
    output_options(usage, ("table", "json", "csv"))

    invoice = commands.add_parser(
        "invoice", formatter_class=formatter, help="a tenant's monthly invoice (draft or closed)",
        description="The invoice of a month: a line per model, the allowance, overage, "
                    "adjustments for late usage of closed months, the total. An open month "
                    "shows a draft; --close freezes an ended month (idempotent: closing again "
                    "returns the stored invoice). docs/billing.md has the rules.",
        epilog="Example: tenantry invoice --all --month 2026-10 --close -o json > oct.json")
    tenant_or_all(invoice, "every Tenant (with a progress bar)")
    invoice.add_argument("--month", required=True, metavar="YYYY-MM")
    invoice.add_argument("--close", action="store_true",
                         help="freeze the month's invoice (only once the month has ended)")
    output_options(invoice, ("table", "json"))

    keys = commands.add_parser("keys", help="API keys (metadata only, never a key)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_list = keys_commands.add_parser(
        "list", formatter_class=formatter, help="names, prefixes, created, expiry, last use",
        description="A tenant's API keys as the runtime holds them: name, public prefix, "
                    "when it was issued, expiry and state, and the last metered request made "
                    "with each (rows arrive seconds after a request). The keys "
                    "themselves are never read or shown (the runtime has only their hashes).")
    keys_list.add_argument("--tenant", required=True, help="the Tenant's name")
    output_options(keys_list, ("table", "json", "csv"))

    tenants = commands.add_parser(
        "tenants", formatter_class=formatter, help="every tenant's status and usage this month",
        description="Like `kubectl get tnt` plus this month's (UTC) requests, tokens and list "
                    "cost from the usage logs.")
    output_options(tenants, ("table", "json", "csv"))

    export = commands.add_parser(
        "export", formatter_class=formatter, help="send metered usage to the billing provider",
        description="Exports ai_usage_logs to OpenMeter (CloudEvents) or Stripe (meter "
                    "events), each request once: the request id is the event id, and a "
                    "checkpoint in Postgres moves only past what the provider acknowledged, so "
                    "a crash resumes without a gap or a double send. Settings: the "
                    "TENANTRY_EXPORT_* environment variables (docs/billing-export-alerts.md). "
                    "Exit 4 when the provider or database is unreachable (the next run "
                    "resumes), 6 when the provider refused a batch or the settings are wrong.",
        epilog="Example: TENANTRY_EXPORT_OPENMETER_URL=https://openmeter.example "
               "tenantry export")
    export.add_argument("--follow", action="store_true",
                        help="keep exporting as usage arrives (default: what is pending, then "
                             "exit, as a CronJob would)")

    docs = commands.add_parser("documents", help="the runtime's shared document registry")
    docs_commands = docs.add_subparsers(dest="documents_command", required=True,
                                        metavar="ACTION")
    backfill = docs_commands.add_parser(
        "backfill", formatter_class=formatter, help="register every document id in Redis",
        description="The response sanitizer redacts another tenant's document ids on every "
                    "runtime replica by asking Redis who owns a UUID (docs/runtime.md). The "
                    "runtime registers the documents it creates; this registers those "
                    "created before it did (or while Redis was unreachable) and drops ids of "
                    "documents that are gone, reading each tenant's documents as that "
                    "tenant. Idempotent. Exit 4 when a database or Redis is unreachable.",
        epilog="Example: tenantry documents backfill --all")
    tenant_or_all(backfill, "every Tenant")
    output_options(backfill, ("table", "json", "csv"))

    check = commands.add_parser(
        "doctor", formatter_class=formatter, help="check connections and configuration",
        description="Checks what the operator and runtime need (Kubernetes, CRDs, the runtime "
                    "namespace, Postgres and its migrations and partitions, Redis, the price "
                    "table and the plans) and says in plain words what is wrong and how to "
                    "fix it. Exit 0 when all is well, 5 when something is wrong.")
    output_options(check, ("table", "json"))
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    src = Sources()
    try:
        if args.command == "invoice":
            return cmd_invoice(src, args)
        if args.command == "export":
            from tenantry_runtime import export

            # export's own codes (1 unavailable, 2 refused) in the CLI's documented ones.
            code = export.main([] if args.follow else ["--once"])
            return {0: 0, 1: 4, 2: 6}.get(code, 1)
        if args.command == "doctor":
            checks = doctor.run(src)
            if args.output == "json":
                print(to_json({"ok": doctor.healthy(checks),
                               "checks": [c.as_dict() for c in checks]}))
            else:
                print(doctor.render(checks))
            return 0 if doctor.healthy(checks) else 5
        handler = {"usage": cmd_usage, "keys": cmd_keys, "tenants": cmd_tenants,
                   "documents": cmd_documents}[args.command]
        document, rows, columns = handler(src, args)
        _print(args, document, rows, columns)
        if args.command == "documents" and any(row["problem"] for row in rows):
            return UNREACHABLE
        return 0
    except CliError as error:
        print(f"tenantry: {error}" + (f"\n  fix: {error.fix}" if error.fix else ""),
              file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
