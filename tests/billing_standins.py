"""Stand-ins for billing tests: OpenMeter's ingest API, and a tenant's alert webhook receiver.

The OpenMeter stand-in checks each request as OpenMeter does (CloudEvents 1.0 required
attributes, a subject, the content types of POST /api/v1/events, the bearer token) and, like
OpenMeter, deduplicates on (source, id): `accepted` lists each event once, in arrival order;
`duplicates` counts the resent ones it dropped.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def cloudevent_problems(event: Any) -> list[str]:
    """What makes `event` unacceptable to OpenMeter (empty: acceptable)."""
    if not isinstance(event, dict):
        return ["an event must be a JSON object"]
    problems = []
    if event.get("specversion") != "1.0":
        problems.append(f"specversion must be '1.0', got {event.get('specversion')!r}")
    for name in ("id", "source", "type", "subject"):
        if not isinstance(event.get(name), str) or not event[name]:
            problems.append(f"{name} must be a non-empty string")
    time = event.get("time")
    if time is not None:
        if not isinstance(time, str) or not _RFC3339.fullmatch(time):
            problems.append(f"time must be RFC 3339, got {time!r}")
        else:
            datetime.fromisoformat(time)
    if event.get("datacontenttype", "application/json") != "application/json":
        problems.append("datacontenttype must be application/json")
    if "data" in event and not isinstance(event["data"], dict):
        problems.append("data must be a JSON object")
    return problems


@dataclass
class OpenMeterStandIn:
    token: str | None = None
    # Answers to give before accepting anything: (status, retry-after header or None).
    fail_next: list[tuple[int, str | None]] = field(default_factory=list)
    # After accepting this many batches, hold the next acknowledgement until `release`.
    hold_after_batches: int | None = None
    accepted: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    batches: int = 0
    rejected: list[str] = field(default_factory=list)
    failures_sent: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted_ids(self) -> list[str]:
        with self._lock:
            return [e["id"] for e in self.accepted]

    def _record(self, events: list[dict[str, Any]]) -> int:
        with self._lock:
            for event in events:
                key = (event["source"], event["id"])
                if key in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add(key)
                self.accepted.append(event)
            self.batches += 1
            return self.batches

    async def ingest(self, request: Request) -> Response:
        if self.token is not None and \
                request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"title": "Unauthorized"}, status_code=401)
        with self._lock:
            if self.fail_next:
                status, retry_after = self.fail_next.pop(0)
                self.failures_sent += 1
                headers = {} if retry_after is None else {"retry-after": retry_after}
                return JSONResponse({"title": "try again"}, status_code=status,
                                    headers=headers)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self._bad("body is not JSON")
        if content_type == SINGLE:
            events = [body]
        elif content_type == BATCH and isinstance(body, list) and body:
            events = body
        else:
            return self._bad(f"content type {content_type!r} with a "
                             f"{type(body).__name__} body")
        problems = [f"event {i}: {p}" for i, e in enumerate(events)
                    for p in cloudevent_problems(e)]
        if problems:
            return self._bad("; ".join(problems))
        batches = self._record(events)
        if self.hold_after_batches is not None and batches > self.hold_after_batches:
            # Recorded, but not acknowledged: the exporter is killed while it waits.
            await asyncio.to_thread(self.release.wait)
        return Response(status_code=204)

    def _bad(self, problem: str) -> Response:
        with self._lock:
            self.rejected.append(problem)
        return JSONResponse({"title": "Bad Request", "detail": problem}, status_code=400)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/api/v1/events", self.ingest, methods=["POST"])])


@dataclass
class WebhookReceiver:
    """A tenant's alert endpoint: checks each signature as the docs tell receivers to."""

    secret: bytes
    fail_first: int = 0
    # Every attempt: (alert id, signature valid, status answered).
    attempts: list[tuple[str, bool, int]] = field(default_factory=list)
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def receive(self, request: Request) -> Response:
        from tenantry_runtime.alerts import ALERT_ID_HEADER, SIGNATURE_HEADER, verify

        body = await request.body()
        alert_id = request.headers.get(ALERT_ID_HEADER, "")
        valid = verify(self.secret, request.headers.get(SIGNATURE_HEADER, ""), body)
        with self._lock:
            status = 401 if not valid else 500 if self.fail_first > 0 else 204
            if valid and self.fail_first > 0:
                self.fail_first -= 1
            self.attempts.append((alert_id, valid, status))
            if status == 204 and alert_id not in self.delivered:  # dedupe on the alert id
                self.delivered[alert_id] = json.loads(body)
        return Response(status_code=status)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hooks/tenantry", self.receive, methods=["POST"])])


@dataclass
class StripeStandIn:
    """Stripe's POST /v1/billing/meter_events as documented: a form with event_name,
    identifier, timestamp (the last 35 days, at most 5 minutes ahead), payload[...]; an
    identifier it holds is refused with 400 (as Stripe does), not silently dropped."""

    api_key: str
    hold_after_events: int | None = None
    accepted: list[dict[str, str]] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted_ids(self) -> list[str]:
        with self._lock:
            return [e["identifier"] for e in self.accepted]

    def problems(self, form: dict[str, str]) -> list[str]:
        import time as clock

        problems = []
        if not 0 < len(form.get("event_name", "")) <= 100:
            problems.append("event_name")
        if not 0 < len(form.get("identifier", "")) <= 100:
            problems.append("identifier")
        if not form.get("payload[stripe_customer_id]", "").startswith("cus_"):
            problems.append("payload[stripe_customer_id]")
        if not form.get("payload[value]", "").isdigit():
            problems.append("payload[value]")
        stamp = form.get("timestamp", "")
        if not stamp.isdigit() or not clock.time() - 35 * 86400 <= int(stamp) \
                <= clock.time() + 300:
            problems.append("timestamp")
        return problems

    async def create(self, request: Request) -> Response:
        from urllib.parse import parse_qsl

        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"type": "invalid_request_error",
                                           "message": "Invalid API Key provided"}}, 401)
        if request.headers.get("content-type", "") != "application/x-www-form-urlencoded":
            return self._bad("content type")
        form = dict(parse_qsl((await request.body()).decode(), strict_parsing=True))
        if problems := self.problems(form):
            return self._bad(", ".join(problems))
        with self._lock:
            if any(e["identifier"] == form["identifier"] for e in self.accepted):
                self.duplicates += 1
                return JSONResponse({"error": {
                    "type": "invalid_request_error",
                    "message": f"An event already exists with identifier "
                               f"{form['identifier']}."}}, 400,
                    headers={"stripe-should-retry": "false"})
            self.accepted.append(form)
            held = self.hold_after_events is not None and \
                len(self.accepted) > self.hold_after_events
        if held:  # recorded, but the answer never reaches the exporter
            await asyncio.to_thread(self.release.wait)
        return JSONResponse({"object": "billing.meter_event", **form})

    def _bad(self, problem: str) -> Response:
        with self._lock:
            self.rejected.append(problem)
        return JSONResponse({"error": {"type": "invalid_request_error", "message": problem}}, 400)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/billing/meter_events", self.create,
                                       methods=["POST"])])
