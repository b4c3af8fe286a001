"""`tenantry doctor`: each check says what it looked at, what is wrong, and the fix."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from lightkube import ApiError
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Namespace, Secret
from pydantic import ValidationError
from tenantry_runtime.billing import BillingTerms, PriceBook, load_price_book
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import APP_ROLE, SHARED_SCHEMA, load_migrations

from .sources import CliError, Sources, TenantPlan, redacted

OK, WARN, FAIL = "ok", "warn", "fail"
# The runtime's own variable: check the table it will really load.
PRICE_TABLE_ENV = "TENANTRY_RUNTIME_PRICE_TABLE"


def price_book() -> PriceBook:
    path = os.environ.get(PRICE_TABLE_ENV)
    return load_price_book(Path(path) if path else None)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def healthy(checks: list[Check]) -> bool:
    return all(c.status != FAIL for c in checks)


def render(checks: list[Check]) -> str:
    mark = {OK: "[ok]  ", WARN: "[warn]", FAIL: "[FAIL]"}
    lines = []
    for check in checks:
        lines.append(f"{mark[check.status]} {check.name}: {check.message}")
        if check.fix and check.status != OK:
            lines.append(f"       fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    lines.append("" if not failed else f"\n{failed} problem(s) found.")
    return "\n".join(lines).rstrip()


def _kubernetes(src: Sources) -> list[Check]:
    try:
        kube = src.kube
        next(iter(kube.list(Namespace, chunk_size=1)))
    except CliError as error:
        return [Check("kubernetes", FAIL, str(error), error.fix)]
    except (ApiError, OSError, StopIteration) as error:
        return [Check("kubernetes", FAIL, f"the API server did not answer: {error}",
                      "check KUBECONFIG (kubectl get ns must work with it)")]
    checks = [Check("kubernetes", OK, "the API server answers")]
    for crd in ("tenants.tenantry.dev", "tenantplans.tenantry.dev"):
        try:
            kube.get(CustomResourceDefinition, crd)
            checks.append(Check(f"crd {crd}", OK, "installed"))
        except ApiError:
            checks.append(Check(f"crd {crd}", FAIL, "not installed: Tenants cannot exist",
                                "kubectl apply -f crds/ (or install the Helm chart)"))
    namespace = src.settings.runtime_namespace
    try:
        kube.get(Namespace, namespace)
        selector: dict[str, Any] = {runtime_record.LABEL_RECORD: runtime_record.RECORD_VERSION}
        records = list(kube.list(Secret, namespace=namespace, labels=selector))
        checks.append(Check("runtime namespace", OK,
                            f"{namespace!r} holds {len(records)} tenant record(s)"))
    except ApiError:
        checks.append(Check("runtime namespace", FAIL,
                            f"namespace {namespace!r} does not exist: the runtime has no "
                            "tenant records to read",
                            "set TENANTRY_RUNTIME_NAMESPACE to the runtime's namespace"))
    plans = list(kube.list(TenantPlan)) if all(c.status == OK for c in checks[1:3]) else []
    try:
        book = price_book()
    except (ValidationError, OSError):
        return checks  # reported by the price table check
    priced = book.latest().models
    for plan in plans:
        spec = plan.get("spec") or {}
        name = plan.metadata.name if plan.metadata else "?"
        try:
            terms = BillingTerms.from_plan(spec.get("billing"))
        except (ValueError, ValidationError) as error:
            checks.append(Check(f"plan {name}", FAIL, f"billing does not parse: {error}",
                                "fix spec.billing of the TenantPlan"))
            continue
        problems = []
        if spec.get("model") not in priced:
            problems.append(f"its model {spec.get('model')!r} has no price in the price table "
                            f"(version {book.latest().version}): its requests are not charged")
        if terms.mode.endswith("list") and terms.currency != book.currency:
            problems.append(f"it bills list prices in {terms.currency} but the price table is "
                            f"in {book.currency}: its invoices will be refused")
        checks.append(Check(f"plan {name}", WARN if problems else OK,
                            "; ".join(problems) or f"{terms.mode}, {terms.currency}",
                            "add the model to prices.json (TENANTRY_RUNTIME_PRICE_TABLE) or "
                            "set the plan's currency / overagePricePerMillionTokens"))
    return checks


def _postgres(src: Sources) -> list[Check]:
    if src.settings.database_url is None:
        return [Check("postgres", FAIL, "TENANTRY_DATABASE_URL is not set",
                      "export TENANTRY_DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DB "
                      "(the operator's admin DSN of the shared Postgres)")]
    dsn = src.settings.database_url.get_secret_value()
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [Check("postgres", FAIL, f"cannot connect to {redacted(dsn)}: {first}",
                      "check host, port, user and password in TENANTRY_DATABASE_URL, and that "
                      "the server accepts connections from here")]
    checks = [Check("postgres", OK, f"connected to {redacted(dsn)}")]
    with conn:
        found = conn.execute("SELECT to_regclass(%s)",
                             (f"{SHARED_SCHEMA}.schema_migrations",)).fetchone()
        if found is None or found[0] is None:
            return [*checks, Check("migrations", FAIL, f"schema {SHARED_SCHEMA!r} is not "
                                   "bootstrapped", "start the operator once: it migrates the "
                                   "shared schema at startup")]
        applied = {int(v) for (v,) in conn.execute(
            f"SELECT version FROM {SHARED_SCHEMA}.schema_migrations").fetchall()}  # noqa: S608
        missing = [m for m in load_migrations() if m.version not in applied]
        checks.append(Check("migrations", FAIL if missing else OK,
                            f"missing: {', '.join(f'{m.version:04d}_{m.name}' for m in missing)}"
                            if missing else f"all {len(applied)} applied",
                            "restart (or upgrade) the operator: it applies migrations at "
                            "startup"))
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
        checks.append(Check("runtime role", OK if role else FAIL,
                            f"role {APP_ROLE!r} " + ("exists" if role else "is missing"),
                            "start the operator once: it creates the role"))
        month = datetime.now(UTC).strftime("%Y_%m")
        partition = conn.execute("SELECT to_regclass(%s)", (
            f"{SHARED_SCHEMA}.ai_usage_logs_{month}",)).fetchone()
        present = partition is not None and partition[0] is not None
        checks.append(Check("partitions", OK if present else WARN,
                            f"this month's usage partition {'exists' if present else 'is missing'}"
                            + ("" if present else ": rows land in the DEFAULT partition"),
                            "keep the operator running: its maintenance creates partitions "
                            "ahead every TENANTRY_MAINTENANCE_INTERVAL_SECONDS"))
    return checks


def _redis(src: Sources) -> list[Check]:
    if src.settings.redis_url is None:
        return [Check("redis", FAIL, "TENANTRY_REDIS_URL is not set",
                      "export TENANTRY_REDIS_URL=redis://HOST:6379/0 (where limits are kept)")]
    url = src.settings.redis_url.get_secret_value()
    try:
        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as error:
        return [Check("redis", FAIL, f"no answer from {url.split('@')[-1]}: {error}",
                      "check TENANTRY_REDIS_URL and that Redis runs (budgets and rate limits "
                      "live there: without it the runtime refuses requests)")]
    return [Check("redis", OK, "answers PING")]


def _prices() -> list[Check]:
    try:
        book = price_book()
    except (ValidationError, OSError) as error:
        first = str(error).splitlines()[0]
        where = os.environ.get(PRICE_TABLE_ENV) or "the shipped prices.json"
        return [Check("price table", FAIL, f"{where} does not load: {first}",
                      f"fix the file named by {PRICE_TABLE_ENV} (docs/billing.md has the "
                      "format), or unset it to use the shipped table")]
    latest = book.latest()
    return [Check("price table", OK, f"{len(book.versions)} version(s), in force: "
                  f"{latest.version} since {latest.effective_from:%Y-%m-%d}, "
                  f"{len(latest.models)} models, {book.currency}")]


STEPS: tuple[Callable[[Sources], list[Check]], ...] = (
    _kubernetes, _postgres, _redis, lambda _src: _prices())


def run(src: Sources) -> list[Check]:
    checks: list[Check] = []
    for step in STEPS:
        checks += step(src)
    return checks
