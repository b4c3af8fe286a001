"""Usage export to a billing provider: `ai_usage_logs` rows to OpenMeter or Stripe.

`python -m tenantry_runtime.export [--once]` reads the rows of every schema with usage (the
shared one and each bridge tenant's; or the one configured) in batches and sends them:
- OpenMeter (default): each batch as CloudEvents to its ingest API (`POST /api/v1/events`,
  `application/cloudevents-batch+json`). One event per row: id = the request id (OpenMeter
  deduplicates on source + id), subject = the tenant, data = model, tokens and cost.
- Stripe: one meter event per row (`POST /v1/billing/meter_events`), identifier = the request
  id; Stripe refuses an identifier it holds, which for a resent row means "already sent".

Exactly once, as the provider sees it:
- Rows are read in (export_xid, tenant_id, request_id, created_at) order, only below the
  oldest running transaction (migration 0009 says why): a late row is never passed over.
- The checkpoint (the last row of a batch, per exporter and schema, in the operator's private
  schema) moves only after the provider acknowledged the whole batch. A crash in between resends
  the batch; the provider drops the ids it already has. A crash never skips.
- 429 and 5xx (and connection errors) are retried with exponential backoff, honouring
  Retry-After; other 4xx stop the exporter with the provider's answer (a bad token or payload
  is not fixed by retrying), the checkpoint where it was.

Reading every tenant's rows needs a login that bypasses RLS and owns the private schema: the
operator's admin DSN (`TENANTRY_EXPORT_DATABASE_URL`).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any, Literal, Protocol

import httpx
import psycopg
from psycopg import sql
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contracts.database import (
    PRIVATE_SCHEMA,
    ensure_private_schema,
    fetch_rows,
    validate_identifier,
)

log = logging.getLogger(__name__)

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
INGEST_PATH = "/api/v1/events"
STRIPE_PATH = "/v1/billing/meter_events"
ALL_SCHEMAS = "*"
# Before the first row: no real row sorts below it (tenant ids are never empty).
START = ("0", "", "", datetime(1, 1, 1, tzinfo=UTC))
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})


class ExportSettings(BaseSettings):
    """Usage export (issue 10), from TENANTRY_EXPORT_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="TENANTRY_EXPORT_")

    database_url: SecretStr = Field(
        description="Admin DSN of the shared database (bypasses RLS, owns the private schema).")
    schema_name: str = Field(ALL_SCHEMAS, pattern=r"^(\*|[a-z_][a-z0-9_]{0,62})$",
                             description='The schema to export; "*": every schema with usage.')
    exporter: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="This exporter's checkpoint name; the provider's name when unset, so a "
                    "second provider starts from the first row, not from the other's place.")
    provider: Literal["openmeter", "stripe"] = Field("openmeter")
    openmeter_url: str | None = Field(None, description="e.g. https://openmeter.cloud.")
    openmeter_token: SecretStr | None = Field(None, description="Bearer token (OpenMeter Cloud).")
    source: str = Field("tenantry", min_length=1, description="The CloudEvents source.")
    event_type: str = Field("tenantry.ai.usage", min_length=1,
                            description="The CloudEvents type (OpenMeter meters filter on it).")
    # Stripe meter events (provider=stripe): one event per row, value = billable tokens.
    stripe_url: str = Field("https://api.stripe.com")
    stripe_api_key: SecretStr | None = Field(None, description="A secret or restricted key.")
    stripe_event_name: str = Field("tenantry_tokens", min_length=1, max_length=100,
                                   description="The event_name of the Stripe meter.")
    stripe_customers: dict[str, str] = Field(
        default_factory=dict, description="Tenant id -> Stripe customer id (JSON).")
    batch_size: int = Field(500, ge=1, le=10000)
    interval_seconds: float = Field(5.0, gt=0, description="Pause when nothing is left to send.")
    attempts: int = Field(8, ge=1, description="Tries per batch before the round gives up.")
    backoff_seconds: float = Field(0.5, gt=0)
    backoff_max_seconds: float = Field(30.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)

    @property
    def checkpoint_name(self) -> str:
        return self.exporter or self.provider


class ExportRejected(RuntimeError):
    """The provider refused a batch for good (4xx other than 429): retrying will not help."""


class ProviderUnavailable(RuntimeError):
    """The provider did not acknowledge a batch within the allowed attempts."""


@dataclass(frozen=True)
class UsageRecord:
    export_xid: str
    tenant: str
    request_id: str
    created_at: datetime
    model: str
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost: Decimal | None
    currency: str | None
    price_version: str | None

    @property
    def position(self) -> tuple[str, str, str, datetime]:
        return self.export_xid, self.tenant, self.request_id, self.created_at


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def cloud_event(record: UsageRecord, source: str, event_type: str) -> dict[str, Any]:
    """Pure: one usage row as a CloudEvents 1.0 event in the shape OpenMeter ingests."""
    data: dict[str, Any] = {
        "model": record.model,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "cache_creation_input_tokens": record.cache_creation_input_tokens,
        "cache_read_input_tokens": record.cache_read_input_tokens,
        "tokens": (record.input_tokens + record.output_tokens
                   + record.cache_creation_input_tokens + record.cache_read_input_tokens),
    }
    if record.cost is not None:
        # Exact: a decimal string (OpenMeter parses numeric strings), never a float.
        data["cost"] = f"{record.cost.normalize():f}"
        data["currency"] = record.currency
        data["price_version"] = record.price_version
    return {"specversion": "1.0", "id": record.request_id, "source": source,
            "type": event_type, "subject": record.tenant, "time": _rfc3339(record.created_at),
            "datacontenttype": "application/json", "data": data}


def _batch_query(schema: str) -> sql.Composed:
    # ORDER BY names the table's columns (u.): the output column export_xid::text would sort
    # as text ('10' < '9') and the checkpoint would pass rows over. In index order.
    return sql.SQL("""
        SELECT u.export_xid::text, u.tenant_id, u.request_id, u.created_at, u.model,
               u.input_tokens, u.output_tokens, u.cache_creation_input_tokens,
               u.cache_read_input_tokens, u.cost, u.currency, u.price_version
        FROM {}.ai_usage_logs AS u
        WHERE (u.export_xid, u.tenant_id, u.request_id, u.created_at) > (%s::xid8, %s, %s, %s)
          AND u.export_xid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY u.export_xid, u.tenant_id, u.request_id, u.created_at
        LIMIT %s""").format(sql.Identifier(validate_identifier(schema)))


_CHECKPOINTS = sql.Identifier(PRIVATE_SCHEMA, "usage_export_checkpoints")


def read_checkpoint(conn: psycopg.Connection[Any], exporter: str,
                    schema: str) -> tuple[str, str, str, datetime]:
    rows = fetch_rows(conn, sql.SQL(
        "SELECT export_xid::text, tenant_id, request_id, created_at FROM {}"
        " WHERE exporter = %s AND source_schema = %s").format(_CHECKPOINTS), (exporter, schema))
    return START if not rows else (rows[0][0], rows[0][1], rows[0][2], rows[0][3])


def save_checkpoint(conn: psycopg.Connection[Any], exporter: str, schema: str,
                    last: UsageRecord, count: int) -> None:
    """Move the checkpoint to `last`; never backwards (a second exporter of the same name
    that lags behind only resends, which the provider drops)."""
    conn.execute(sql.SQL("""
        INSERT INTO {0} AS c (exporter, source_schema, export_xid, tenant_id, request_id,
                              created_at, exported)
        VALUES (%s, %s, %s::xid8, %s, %s, %s, %s)
        ON CONFLICT (exporter, source_schema) DO UPDATE
        SET export_xid = EXCLUDED.export_xid, tenant_id = EXCLUDED.tenant_id,
            request_id = EXCLUDED.request_id, created_at = EXCLUDED.created_at,
            exported = c.exported + EXCLUDED.exported, updated_at = now()
        WHERE (c.export_xid, c.tenant_id, c.request_id, c.created_at)
              < (EXCLUDED.export_xid, EXCLUDED.tenant_id, EXCLUDED.request_id,
                 EXCLUDED.created_at)""").format(_CHECKPOINTS),
        (exporter, schema, *last.position, count))


def read_batch(conn: psycopg.Connection[Any], schema: str,
               after: tuple[str, str, str, datetime], limit: int) -> list[UsageRecord]:
    return [UsageRecord(*row) for row in fetch_rows(conn, _batch_query(schema), (*after, limit))]


def require_bypass(conn: psycopg.Connection[Any]) -> None:
    """Refuse a login that RLS would filter: it would export nothing and look healthy."""
    allowed = fetch_rows(conn, "SELECT rolsuper OR rolbypassrls FROM pg_roles"
                               " WHERE rolname = current_user")
    if not allowed or not allowed[0][0]:
        raise ExportRejected(
            "the export login neither is a superuser nor has BYPASSRLS, so row-level security "
            "would hide every tenant's usage: use the operator's admin DSN")


@dataclass
class Retrying:
    """One provider call retried on 429, 5xx and connection errors, with exponential backoff
    and jitter, honouring Retry-After; returns the first other answer (success or refusal)."""

    attempts: int
    backoff_seconds: float
    backoff_max_seconds: float
    provider: str
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_settings(cls, settings: ExportSettings, provider: str) -> Retrying:
        return cls(settings.attempts, settings.backoff_seconds, settings.backoff_max_seconds,
                   provider)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.backoff_max_seconds)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        base = min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** attempt)
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret

    def call(self, request: Callable[[], httpx.Response]) -> httpx.Response:
        problem = ""
        for attempt in range(self.attempts):
            retry_after = None
            try:
                response = request()
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                # Stripe says outright whether a retry can help (e.g. a 409 lock timeout).
                should_retry = response.headers.get("stripe-should-retry")
                if should_retry != "true" and (response.status_code not in RETRYABLE
                                               or should_retry == "false"):
                    return response
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("retry-after")
            if attempt + 1 < self.attempts:
                delay = self._delay(attempt, retry_after)
                log.warning("%s did not take it (%s); retrying in %.2fs", self.provider,
                            problem, delay)
                self.sleep(delay)
        raise ProviderUnavailable(f"{self.provider} did not acknowledge after "
                                  f"{self.attempts} attempts ({problem})")


class Sink(Protocol):
    def send(self, records: Sequence[UsageRecord]) -> None:
        """Return once the provider holds every record (or already held it)."""

    def close(self) -> None: ...


@dataclass
class OpenMeterSink:
    """POSTs a batch as CloudEvents to OpenMeter's ingest API; acknowledged when 2xx."""

    client: httpx.Client
    retrying: Retrying
    source: str
    event_type: str

    @classmethod
    def from_settings(cls, settings: ExportSettings) -> OpenMeterSink:
        if settings.openmeter_url is None:
            raise ExportRejected("TENANTRY_EXPORT_OPENMETER_URL is not set")
        headers = {"content-type": BATCH_CONTENT_TYPE}
        if settings.openmeter_token is not None:
            headers["authorization"] = f"Bearer {settings.openmeter_token.get_secret_value()}"
        client = httpx.Client(base_url=settings.openmeter_url.rstrip("/"), headers=headers,
                              timeout=settings.timeout_seconds)
        return cls(client, Retrying.from_settings(settings, "OpenMeter"), settings.source,
                   settings.event_type)

    def send(self, records: Sequence[UsageRecord]) -> None:
        events = [cloud_event(r, self.source, self.event_type) for r in records]
        response = self.retrying.call(lambda: self.client.post(INGEST_PATH, json=events))
        if not response.is_success:
            raise ExportRejected(f"OpenMeter refused a batch of {len(events)} events: "
                                 f"HTTP {response.status_code} {response.text[:500]}")

    def close(self) -> None:
        self.client.close()


def stripe_meter_event(record: UsageRecord, event_name: str,
                       customers: Mapping[str, str]) -> dict[str, str]:
    """Pure: one usage row as Stripe's meter event form (POST /v1/billing/meter_events)."""
    customer = customers.get(record.tenant)
    if customer is None:
        raise ExportRejected(f"tenant {record.tenant} has no Stripe customer in "
                             "TENANTRY_EXPORT_STRIPE_CUSTOMERS; add it, the export waits")
    tokens = (record.input_tokens + record.output_tokens + record.cache_creation_input_tokens
              + record.cache_read_input_tokens)
    return {"event_name": event_name, "identifier": record.request_id,
            "timestamp": str(int(record.created_at.timestamp())),
            "payload[stripe_customer_id]": customer, "payload[value]": str(tokens)}


def _already_recorded(response: httpx.Response) -> bool:
    """Stripe refuses an identifier it holds (400, "An event already exists with identifier
    ..."): for a resent row that is the acknowledgement it never got."""
    if response.status_code != 400:
        return False
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return False
    return "already exists" in str(error.get("message", "")) or \
        error.get("code") == "duplicate_meter_event"


@dataclass
class StripeSink:
    """Meter events to Stripe, one POST a row (the v1 API takes no batches); the identifier
    (the request id) makes a resent row a refusal Stripe keeps for at least 24 hours."""

    client: httpx.Client
    retrying: Retrying
    event_name: str
    customers: Mapping[str, str]

    @classmethod
    def from_settings(cls, settings: ExportSettings) -> StripeSink:
        if settings.stripe_api_key is None:
            raise ExportRejected("TENANTRY_EXPORT_STRIPE_API_KEY is not set")
        client = httpx.Client(
            base_url=settings.stripe_url.rstrip("/"), timeout=settings.timeout_seconds,
            headers={"authorization": f"Bearer {settings.stripe_api_key.get_secret_value()}"})
        return cls(client, Retrying.from_settings(settings, "Stripe"),
                   settings.stripe_event_name, settings.stripe_customers)

    def send(self, records: Sequence[UsageRecord]) -> None:
        for record in records:
            form = stripe_meter_event(record, self.event_name, self.customers)
            response = self.retrying.call(partial(self.client.post, STRIPE_PATH, data=form))
            if not response.is_success and not _already_recorded(response):
                raise ExportRejected(f"Stripe refused the meter event of {record.request_id}: "
                                     f"HTTP {response.status_code} {response.text[:500]}")

    def close(self) -> None:
        self.client.close()


def sink_from_settings(settings: ExportSettings) -> Sink:
    if settings.provider == "stripe":
        return StripeSink.from_settings(settings)
    return OpenMeterSink.from_settings(settings)


@dataclass
class UsageExporter:
    conn: psycopg.Connection[Any]
    sink: Sink
    settings: ExportSettings

    def prepare(self) -> None:
        require_bypass(self.conn)
        ensure_private_schema(self.conn)  # creates the checkpoints table when missing

    def schemas(self) -> list[str]:
        """The schemas to export: the one configured, or with "*" every schema of this
        database that has usage (the shared one and each bridge tenant's)."""
        if self.settings.schema_name != ALL_SCHEMAS:
            return [self.settings.schema_name]
        return [str(row[0]) for row in fetch_rows(self.conn, """
            SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relname = 'ai_usage_logs' AND c.relkind = 'p' ORDER BY 1""")]

    def export_batch(self, schema: str) -> int:
        """Send the schema's next batch and move its checkpoint past it; rows sent (0: none
        pending)."""
        name = self.settings.checkpoint_name
        records = read_batch(self.conn, schema, read_checkpoint(self.conn, name, schema),
                             self.settings.batch_size)
        if not records:
            return 0
        self.sink.send(records)
        save_checkpoint(self.conn, name, schema, records[-1], len(records))
        return len(records)

    def pending(self) -> int:
        """Rows past the checkpoints that could be sent now."""
        return sum(int(fetch_rows(self.conn, sql.SQL("""
            SELECT count(*) FROM {}.ai_usage_logs AS u
            WHERE (u.export_xid, u.tenant_id, u.request_id, u.created_at)
                  > (%s::xid8, %s, %s, %s)
              AND u.export_xid < pg_snapshot_xmin(pg_current_snapshot())""").format(
            sql.Identifier(validate_identifier(schema))),
            read_checkpoint(self.conn, self.settings.checkpoint_name, schema))[0][0])
            for schema in self.schemas())

    def export_pending(self, progress: Callable[[int], None] | None = None) -> int:
        """Batches until nothing is pending; rows sent. `progress` hears the running total."""
        total = 0
        for schema in self.schemas():
            while sent := self.export_batch(schema):
                total += sent
                if progress is not None:
                    progress(total)
        return total

    def run(self) -> None:
        while True:
            try:
                sent = self.export_pending()
                if sent:
                    log.info("exported %d usage events", sent)
            except ProviderUnavailable as error:
                log.warning("%s; resuming from the checkpoint", error)
            time.sleep(self.settings.interval_seconds)


def _progress_log(expected: int) -> Callable[[int], None]:
    """A progress line at most every 5 seconds (a CLI can pass its own progress bar)."""
    last = time.monotonic()

    def report(done: int) -> None:
        nonlocal last
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            share = f" ({100 * done // expected}%)" if expected and done <= expected else ""
            log.info("exported %d of ~%d usage events%s", done, expected, share)

    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 1 provider unavailable (retry later), 2 rejected or misconfigured."""
    parser = argparse.ArgumentParser(
        prog="python -m tenantry_runtime.export",
        description="Export ai_usage_logs to OpenMeter as CloudEvents, resumable and "
                    "idempotent. Settings: TENANTRY_EXPORT_* environment variables.")
    parser.add_argument("--once", action="store_true",
                        help="export what is pending, then exit (for a CronJob)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = ExportSettings()  # from the environment
        sink = sink_from_settings(settings)
    except ValidationError as error:
        problems = "; ".join(f"TENANTRY_EXPORT_{'_'.join(map(str, e['loc'])).upper()}: "
                             f"{e['msg']}" for e in error.errors())
        log.error("the export is not configured: %s", problems)
        return 2
    except ExportRejected as error:
        log.error("%s", error)
        return 2
    try:
        with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True,
                             connect_timeout=10) as conn:
            exporter = UsageExporter(conn, sink, settings)
            exporter.prepare()
            if not args.once:
                exporter.run()
            expected = exporter.pending()
            log.info("%d usage events to export", expected)
            sent = exporter.export_pending(progress=_progress_log(expected))
            log.info("exported %d usage events; nothing pending", sent)
            return 0
    except ExportRejected as error:
        log.error("%s", error)
        return 2
    except (ProviderUnavailable, psycopg.OperationalError) as error:
        log.error("%s; the next run resumes from the checkpoint", error)
        return 1
    finally:
        sink.close()


if __name__ == "__main__":
    sys.exit(main())
