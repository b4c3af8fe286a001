"""`GET /v1/usage`: a tenant's own usage by day and model, read as the tenant (RLS).

Rows come from `ai_usage_logs` where the tenant's data lives: the shared database (the
runtime's login, `settings.database_url`) for pool tenants, the tenant's own login DSN
(`TenantRecord.database_dsn`) for bridge and silo tenants. Every query runs in a
`tenant_transaction`, so the row-level security policy filters by the caller's tenant, and
the statement names the tenant as well (a login that bypasses RLS still reads one tenant).
Rows reach the table seconds after the response (the usage writer's flush interval).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from psycopg import sql
from starlette.responses import JSONResponse, Response

from .contracts.database import tenant_transaction, validate_identifier
from .errors import ApiError
from .settings import RuntimeSettings
from .store import Caller, TenantRecord

log = logging.getLogger(__name__)

DEFAULT_DAYS = 30
LONGEST_SPAN_DAYS = 366


@dataclass(frozen=True)
class UsageWindow:
    """Whole UTC days, `first` to `last` inclusive."""

    first: date
    last: date

    def bounds(self) -> tuple[datetime, datetime]:
        lower = datetime.combine(self.first, time(), tzinfo=UTC)
        return lower, datetime.combine(self.last + timedelta(days=1), time(), tzinfo=UTC)


def _day(name: str, raw: str | None) -> date | None:
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ApiError("invalid_request_error",
                       f"{name}: expected a date as YYYY-MM-DD, got {raw[:40]!r}.") from None


def usage_window(start: str | None, end: str | None, today: date) -> UsageWindow:
    """Pure: the window the query parameters ask for; 400 when they make no sense."""
    first, last = _day("from", start), _day("to", end)
    # Defaults: to = today (UTC), from = the 30 days ending at `to`.
    last = last or today
    if last == date.max or (first is None and last.toordinal() < DEFAULT_DAYS):
        # The default `from` or the bound after `to` would leave the calendar (a 500).
        raise ApiError("invalid_request_error", f"to ({last}) is outside the usable dates.")
    first = first or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise ApiError("invalid_request_error", f"from ({first}) is after to ({last}).")
    if (last - first).days + 1 > LONGEST_SPAN_DAYS:
        raise ApiError("invalid_request_error",
                       f"from..to spans more than {LONGEST_SPAN_DAYS} days; ask in parts.")
    return UsageWindow(first, last)


def _amount(value: Decimal | None) -> str:
    """An exact decimal as a plain string without trailing zeros ("0" for none)."""
    if value is None or value == 0:
        return "0"
    return f"{value.normalize():f}"


def usage_query(schema: str) -> sql.Composed:
    return sql.SQL("""
        SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model, count(*),
               sum(input_tokens), sum(output_tokens), sum(cache_creation_input_tokens),
               sum(cache_read_input_tokens), sum(cost), count(*) - count(cost), max(currency)
        FROM {}.ai_usage_logs
        WHERE tenant_id = %s AND created_at >= %s AND created_at < %s
        GROUP BY 1, 2 ORDER BY 1, 2
    """).format(sql.Identifier(validate_identifier(schema)))


def read_usage(dsn: str, record: TenantRecord, window: UsageWindow) -> list[dict[str, Any]]:
    """I/O: the tenant's usage rows in `window`, one per day and model."""
    tenant = record.config.tenant
    lower, upper = window.bounds()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn, \
            tenant_transaction(conn, tenant):
        rows = conn.execute(usage_query(record.config.database.schema_name),
                            (tenant, lower, upper)).fetchall()
    return [{"date": day.isoformat(), "model": model, "requests": requests,
             "input_tokens": int(inputs), "output_tokens": int(outputs),
             "cache_creation_input_tokens": int(cache_writes),
             "cache_read_input_tokens": int(cache_reads), "cost": _amount(cost),
             "currency": currency, "unpriced_requests": unpriced}
            for (day, model, requests, inputs, outputs, cache_writes, cache_reads, cost,
                 unpriced, currency) in rows]


def usage_dsn(record: TenantRecord, settings: RuntimeSettings) -> str:
    """Where the tenant's usage rows can be read, or 503 when this runtime cannot read them."""
    if record.config.database.kind != "shared":
        if record.database_dsn is None:
            raise ApiError("api_error", "Usage of this tenant is not readable yet (no database "
                           "credentials).", status=503)
        return record.database_dsn.get_secret_value()
    if settings.database_url is None:
        raise ApiError("api_error", "Usage is not recorded by this runtime.", status=503)
    return settings.database_url.get_secret_value()


def usage_router(authenticate: Callable[[Request], Awaitable[Caller]],
                 settings_of: Callable[[Request], RuntimeSettings]) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/usage")
    async def usage(request: Request) -> Response:
        caller = await authenticate(request)
        window = usage_window(request.query_params.get("from"),
                              request.query_params.get("to"), datetime.now(UTC).date())
        dsn = usage_dsn(caller.record, settings_of(request))
        try:
            data = await asyncio.to_thread(read_usage, dsn, caller.record, window)
        except psycopg.Error as error:
            log.warning("usage of %s unreadable: %s", caller.config.tenant,
                        type(error).__name__)
            raise ApiError("api_error", "Usage is unavailable: the database did not answer.",
                           status=503, retry_after=5) from None
        return JSONResponse({"object": "usage", "from": window.first.isoformat(),
                             "to": window.last.isoformat(), "data": data})

    return router
