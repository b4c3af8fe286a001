"""The tenant-facing HTTP API: thin routes over auth, policy, limits and the upstream call."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.asyncio import Redis as StreamRedis
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from .alerts import alerts_call, fired_alerts
from .asgi import (
    EVENT_STREAM,
    JSON,
    BodyReader,
    Headers,
    HotRoute,
    Reply,
    RuntimeApp,
    collect_body,
    error_reply,
    new_request_id,
)
from .document_registry import DocumentRegistry
from .errors import ApiError, error_body, kind_for_status
from .kube_source import KubeSource
from .limits import (
    Limiter,
    LimitKeys,
    Settlement,
    Usage,
    estimate_input_tokens,
    limit_keys,
    refusal,
    reservation,
)
from .local_limits import LocalLimits, LogThrottle
from .messages import (
    StreamUsage,
    parse_count_tokens_request,
    parse_json_object,
    parse_messages_request,
    usage_of_message,
)
from .metering import UsageWriter
from .metrics import CONTENT_TYPE, Metrics, merged
from .openapi import install as describe_openapi
from .policy import api_key_of, check_model, check_request, check_tenant_active, endpoint_for
from .pricing import PriceBook, load_price_book
from .rag import Rag, conversation_of
from .resp import PipelinedRedis, RedisUnavailable, ReplyError
from .saturation import SaturationGate
from .settings import RuntimeSettings
from .spool import SettlementSpool
from .store import Caller, DirectorySource, TenantStore
from .uncancellable import uncancellable
from .upstream import STREAM_ERRORS, Endpoint, UpstreamResponse, Upstreams
from .usage import usage_router

log = logging.getLogger(__name__)
REDIS_ERRORS = (RedisUnavailable, ReplyError)
T = TypeVar("T")


@dataclass
class Runtime:
    """Everything the routes share, built once per app."""

    settings: RuntimeSettings
    store: TenantStore
    redis: PipelinedRedis
    limiter: Limiter
    upstreams: Upstreams
    prices: PriceBook
    spool: SettlementSpool | None = None
    # Failures with no client to tell, for /metrics later.
    failures: Counter[str] = field(default_factory=Counter)
    # Admitted requests per tenant not yet settled (this replica).
    in_flight: Counter[str] = field(default_factory=Counter)
    metrics: Metrics = field(default_factory=lambda: Metrics(200))
    gate: SaturationGate = field(default_factory=lambda: SaturationGate(0, 0))
    local_limits: LocalLimits = field(default_factory=lambda: LocalLimits(1))
    log_throttle: LogThrottle = field(default_factory=LogThrottle)
    writer: UsageWriter | None = None

    def untrack(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1
        if self.in_flight[tenant] <= 0:
            del self.in_flight[tenant]

    def release(self, tenant: str) -> None:
        self.untrack(tenant)
        self.gate.release()

    background: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)


@dataclass
class Admitted:
    """An admitted request: enough to settle it exactly once."""

    runtime: Runtime
    caller: Caller
    request_id: str
    model: str
    endpoint: Endpoint
    stream: bool
    started: float
    at: datetime
    keys: LimitKeys
    settled: bool = False
    max_tokens: int = 0  # what the request allowed the model to write

    async def settle(self, usage: Usage, status: int) -> None:
        """Charge `usage`, drop the hold, record the event; failures are logged, never raised."""
        if self.settled:
            return
        self.settled = True
        self.runtime.release(self.caller.config.tenant)
        event: dict[str, object] = {
            "request_id": self.request_id, "tenant": self.caller.config.tenant,
            "key": self.caller.key_name, "model": self.model, "status": status,
            "endpoint": self.endpoint.kind, "stream": self.stream,
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 1),
            "at": self.at.isoformat(),
        }
        # The price in effect when the request started: a later change is never retroactive.
        prices = self.runtime.prices
        cost, version = prices.cost(self.model, usage, self.at)
        if cost is None:
            self.runtime.failures["unpriced_model"] += 1
        self.runtime.metrics.settled(self.caller.config.tenant, self.model, status, usage,
                                     time.perf_counter() - self.started, cost, prices.currency)
        event.update(cost=None if cost is None else str(cost), currency=prices.currency,
                     price_version=version)
        settlement = Settlement.of(self.keys, self.request_id, usage, event,
                                   self.runtime.settings.settled_marker_seconds)
        tenant = self.caller.config.tenant
        alerts: Any = None
        try:
            if usage.charged > 0:
                # Budget alerts (issue 10) ride in the settlement's write; a miss is caught
                # by the next request.
                _, alerts = await self.runtime.limiter.settle_then(
                    settlement, alerts_call(tenant, self.at))
            else:
                await self.runtime.limiter.settle(settlement)
        except REDIS_ERRORS as error:
            self.runtime.failures["settle_redis_error"] += 1
            await self._spool(settlement, error)
            return
        if isinstance(alerts, ReplyError):
            self.runtime.failures["alert_check_redis_error"] += 1
            return
        for budget, threshold in fired_alerts(alerts):
            self.runtime.metrics.alert(tenant, budget, threshold)
            log.info("tenant %s reached %d%% of its %s budget", tenant, threshold, budget)

    async def _spool(self, settlement: Settlement, error: Exception) -> None:
        spool = self.runtime.spool
        if spool is not None:
            try:
                await spool.append(settlement)
            except OSError:
                log.exception("spooling the settlement of %s failed", self.request_id)
            else:
                log.warning("Redis unavailable (%s): settlement of %s spooled", error,
                            self.request_id)
                return
        # The hold expires on its own; the charge and the usage event are lost.
        self.runtime.failures["settlement_lost"] += 1
        log.error("settlement of %s lost, Redis unavailable: %s", self.request_id, error)


class SingleFlight(Generic[T]):
    """One run of a coroutine at a time; callers arriving meanwhile await that run's result.
    A caller that leaves does not cancel the run the others wait for."""

    def __init__(self) -> None:
        self._running: asyncio.Future[T] | None = None

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(work())
        return await asyncio.shield(self._running)


def database_answers(dsn: str) -> None:
    """Raises psycopg.Error unless the database accepts a connection and a query."""
    with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
        conn.execute("SELECT 1")


def check_metrics_token(settings: RuntimeSettings, request: Request) -> None:
    """With `metrics_token` set, /metrics answers only to `Authorization: Bearer <token>`."""
    if settings.metrics_token is None:
        return
    expected = f"Bearer {settings.metrics_token.get_secret_value()}".encode()
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, expected):
        raise ApiError("authentication_error", "/metrics needs the metrics bearer token.")


def starlette_response(reply: Reply) -> Response:
    if reply.stream is None:
        return Response(reply.body, status_code=reply.status, media_type=JSON,
                        headers=reply.headers)
    return StreamingResponse(reply.stream, status_code=reply.status, media_type=EVENT_STREAM,
                             headers=reply.headers)


def error_response(error: ApiError, request_id: str | None = None) -> Response:
    return starlette_response(error_reply(error, request_id))


def authenticate(runtime: Runtime, request: Request) -> Caller:
    return authenticate_headers(runtime, request.headers)


def authenticate_headers(runtime: Runtime, headers: Headers) -> Caller:
    key = api_key_of(headers)
    if key is None:
        raise ApiError("authentication_error", "x-api-key header is required.")
    caller = runtime.store.authenticate(key)
    if caller is None:
        raise ApiError("authentication_error", "invalid x-api-key")
    return caller


async def admitted_caller(runtime: Runtime, request: Request) -> Caller:
    """The authenticated caller of a route beside the hot ones, admitted by its
    requests/min (these routes query the tenant's database, some embed)."""
    request_id = request.state.request_id = new_request_id()
    caller = authenticate(runtime, request)
    await admit_rate_only(runtime, caller, request_id)
    return caller


async def read_body(request: Request, limit: int) -> bytes:
    return await collect_body(request.headers, request.stream(), limit)


async def occupy(runtime: Runtime, caller: Caller) -> None:
    """Take one of the tenant's concurrent slots on this replica and one of the worker's
    (`runtime.release` gives both back); raises the client's error when there is none."""
    tenant = caller.config.tenant
    # A tenant's share of this replica: one tenant's burst cannot take every connection.
    cap = caller.record.max_concurrent_requests or runtime.settings.max_concurrent_per_tenant
    if runtime.in_flight[tenant] >= cap:
        runtime.metrics.rejected(tenant, "concurrency", 429)
        raise ApiError("rate_limit_error", "Too many concurrent requests for this tenant.",
                       retry_after=1)
    runtime.in_flight[tenant] += 1
    try:
        # Saturated: wait for a slot, higher plan tiers first, then 529.
        await runtime.gate.acquire(caller.record.plan_tier)
    except BaseException as error:
        runtime.untrack(tenant)
        if isinstance(error, ApiError):
            runtime.metrics.rejected(tenant, "overloaded", error.status)
        raise


async def admit(runtime: Runtime, caller: Caller, request_id: str, model: str, reserve: int,
                stream: bool, max_tokens: int = 0) -> Admitted:
    """One Redis round trip; raises the client's error when refused."""
    endpoint = endpoint_for(caller.record, runtime.settings)
    tenant = caller.config.tenant
    await occupy(runtime, caller)
    now = datetime.now(UTC)
    keys = limit_keys(tenant, now)
    try:
        verdict, retry_ms = await runtime.limiter.admit(keys, request_id, reserve, now)
    except BaseException as error:
        if not isinstance(error, REDIS_ERRORS):
            runtime.release(tenant)
            raise
        try:
            admit_without_redis(runtime, caller, keys.limits, request_id, reserve, error,
                                budget=True)
        except ApiError:
            runtime.release(tenant)
            raise
    else:
        refused = refusal(verdict, retry_ms)
        if refused is not None:
            runtime.release(tenant)
            runtime.metrics.rejected(tenant, verdict.name.lower(), refused.status)
            raise refused
    return Admitted(runtime, caller, request_id, model, endpoint, stream, time.perf_counter(),
                    now, keys, max_tokens=max_tokens)


def admit_without_redis(runtime: Runtime, caller: Caller, limits_key: str, request_id: str,
                        reserve: int, error: Exception, *, budget: bool) -> None:
    """Redis unreachable: budgets fail closed unless the tenant's record lets them fail
    open; rate limits fall back to this replica's share. Raises the client's error."""
    tenant = caller.config.tenant
    runtime.failures["admit_redis_error"] += 1
    if budget and not caller.record.budget_fail_open:
        runtime.metrics.fallback.add(tenant=runtime.metrics.tenant(tenant), outcome="closed")
        runtime.metrics.rejected(tenant, "limits_unavailable", 503)
        held_back = runtime.log_throttle.due(f"closed:{tenant}")
        if held_back is not None:
            log.warning("admission of %s (%s) refused, Redis unavailable (failing closed; "
                        "%d more since the last line): %s", request_id, tenant, held_back, error)
        raise ApiError("api_error", "Limits are unavailable; try again shortly.", status=503,
                       retry_after=1) from None
    refused = runtime.local_limits.admit(tenant, runtime.limiter.rates_seen.get(limits_key),
                                         reserve)
    outcome = "refused" if refused is not None else "admitted"
    runtime.metrics.fallback.add(tenant=runtime.metrics.tenant(tenant), outcome=outcome)
    held_back = runtime.log_throttle.due(f"local:{tenant}")
    if held_back is not None:
        log.warning("Redis unavailable (%s): %s of %s (%s) on this replica's share of its rate "
                    "limits%s (%d more since the last line)", error, request_id, tenant, outcome,
                    " without a budget check" if budget else "", held_back)
    if refused is not None:
        runtime.metrics.rejected(tenant, "local_rate_limit", refused.status)
        raise refused


async def admit_rate_only(runtime: Runtime, caller: Caller, request_id: str) -> None:
    """count_tokens and the documents API (documents.py) are rate limited like messages:
    requests/min only, no budget, no hold."""
    tenant = caller.config.tenant
    now = datetime.now(UTC)
    keys = limit_keys(tenant, now)
    try:
        verdict, retry_ms = await runtime.limiter.admit(keys, request_id, 0, now,
                                                        rate_only=True)
    except REDIS_ERRORS as error:
        admit_without_redis(runtime, caller, keys.limits, request_id, 0, error, budget=False)
        return
    refused = refusal(verdict, retry_ms)
    if refused is not None:
        runtime.metrics.rejected(tenant, verdict.name.lower(), refused.status)
        raise refused


async def relay_stream(admitted: Admitted, upstream: UpstreamResponse
                       ) -> AsyncGenerator[bytes, None]:
    """Pass SSE bytes through unchanged, reading usage on the way; settle before the answer's
    end goes out, so the usage event is durable before the response completes.

    Held back until the settlement: the chunk that completes the final `message_stop` event
    or an `error` event, and whatever follows. Every chunk before goes out as it arrives (it
    is not kept waiting for the next one), and the response's end (the last chunk of the HTTP
    body) always follows the settlement. (Splitting the completing chunk at `message_stop` was
    measured: one more write per answer, slower at 1 concurrent; bench/README.md.)"""
    seen = StreamUsage()
    status = upstream.status
    held: list[bytes] = []
    handed_off = False
    try:
        async for chunk in upstream.chunks():
            seen.feed(chunk)
            if held or seen.completed or seen.errored:
                held.append(chunk)
            else:
                yield chunk
        # A client leaving now must not cut the settlement (or its spooling) in half; run
        # in this task, not a shield's (bench/README.md, fourth round).
        await uncancellable(admitted.settle(seen.usage, status))
        if held:
            yield b"".join(held)
    except STREAM_ERRORS:
        # Bytes already reached the client: no retry, an SSE error event as Anthropic sends.
        admitted.runtime.failures["upstream_stream_broken"] += 1
        await admitted.settle(seen.usage, 502)
        yield b"".join(held) + b"event: error\ndata: " + error_body(
            "api_error", "The model endpoint broke off the stream.") + b"\n\n"
    except BaseException:
        # The client went away (GeneratorExit or cancellation): the model keeps generating
        # and the tokens are billed, so read the rest off this task, bounded, then settle.
        if not admitted.settled:
            admitted.runtime.spawn(bill_abandoned_stream(admitted, upstream, seen))
            handed_off = True
        raise
    finally:
        if not handed_off:
            upstream.close()


async def bill_abandoned_stream(admitted: Admitted, upstream: UpstreamResponse,
                                seen: StreamUsage) -> None:
    usage = None
    try:
        async with asyncio.timeout(admitted.runtime.settings.abandoned_stream_seconds):
            async for chunk in upstream.chunks():
                seen.feed(chunk)
    except (*STREAM_ERRORS, TimeoutError):
        admitted.runtime.failures["abandoned_stream_unfinished"] += 1
        if not seen.completed:
            # Its final usage (message_delta) never came: the output is charged as the most
            # the request allowed, or a client that leaves mid-answer (the rest running past
            # the read's bound) would have had everything it read billed as one token.
            usage = dataclasses.replace(seen.usage, output_tokens=max(
                seen.usage.output_tokens, admitted.max_tokens))
    finally:
        upstream.close()
        await admitted.settle(usage or seen.usage, 499)


async def serve_messages(runtime: Runtime, rag: Rag, request_id: str, headers: Headers,
                         read: BodyReader) -> Reply:
    """POST /v1/messages: authenticate, check, admit, (RAG), forward, settle, answer."""
    caller = authenticate_headers(runtime, headers)
    body = await read(runtime.settings.max_body_bytes)
    parsed = parse_messages_request(body)
    check_request(caller.record, parsed)
    conversation = conversation_of(headers, parse_json_object(body)) if (
        "tenantry-conversation-id" in headers) else None
    context_bytes = rag.context_allowance(caller, headers)
    reserve = reservation(estimate_input_tokens(len(body) + context_bytes), parsed.max_tokens)
    admitted = await admit(runtime, caller, request_id, parsed.model, reserve, parsed.stream,
                           parsed.max_tokens)
    try:
        forward = await rag.augment(caller, headers, body) if context_bytes else body
        upstream = await runtime.upstreams.send(
            admitted.endpoint, "/v1/messages", forward, headers, read_body=not parsed.stream)
    except ApiError as error:
        # Upstream slow or down (timeout 504, unreachable 502, its 5xx/529): released.
        await admitted.settle(Usage(), error.status)
        raise
    except BaseException:
        # Cancelled or unexpected: settle off this task, it may not await any more.
        runtime.spawn(admitted.settle(Usage(), 499))
        raise
    if not parsed.stream:
        await admitted.settle(usage_of_message(upstream.content), upstream.status)
        content = await rag.finish_message(caller, request_id, body, upstream.content,
                                           conversation, parsed.model)
        return Reply(upstream.status, {"request-id": request_id}, content)
    upstream = rag.wrap_stream(caller, request_id, body, upstream, conversation, parsed.model)
    return Reply(upstream.status, {"request-id": request_id, "cache-control": "no-cache"},
                 stream=relay_stream(admitted, upstream))


async def serve_count_tokens(runtime: Runtime, _: Rag, request_id: str, headers: Headers,
                             read: BodyReader) -> Reply:
    """POST /v1/messages/count_tokens: rate limited, then answered by the endpoint."""
    caller = authenticate_headers(runtime, headers)
    body = await read(runtime.settings.max_body_bytes)
    model = parse_count_tokens_request(body)
    check_tenant_active(caller.record)
    check_model(caller.record, model)
    await admit_rate_only(runtime, caller, request_id)
    endpoint = endpoint_for(caller.record, runtime.settings)
    # Within the tenant's concurrent requests, as messages: the upstream connections are
    # every tenant's.
    await occupy(runtime, caller)
    try:
        upstream = await runtime.upstreams.send(endpoint, "/v1/messages/count_tokens", body,
                                                headers, read_body=True)
    finally:
        runtime.release(caller.config.tenant)
    return Reply(upstream.status, {"request-id": request_id}, upstream.content)


# A hot route before it is bound to an app's runtime and RAG.
Serve = Callable[[Runtime, Rag, str, Headers, BodyReader], Awaitable[Reply]]


def hot_route(app: FastAPI, serve: Serve) -> HotRoute:
    """`serve` over the app's runtime (made by the lifespan, so looked up per request)."""
    def route(request_id: str, headers: Headers, read: BodyReader) -> Awaitable[Reply]:
        return serve(app.state.runtime, app.state.rag, request_id, headers, read)
    return route


async def serve_with_fastapi(route: HotRoute, request: Request) -> Response:
    """A hot route behind FastAPI: what the raw path serves, for OpenAPI and any ASGI server
    that calls FastAPI directly (errors go through the app's exception handlers)."""
    request_id = request.state.request_id = new_request_id()
    reply = await route(request_id, request.headers, lambda limit: read_body(request, limit))
    return starlette_response(reply)


def create_app(settings: RuntimeSettings, store: TenantStore | None = None) -> FastAPI:
    """The runtime app; `store` may be filled by the caller, else from `tenants_dir`."""
    tenants = store if store is not None else TenantStore()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = PipelinedRedis(settings.redis_url.get_secret_value(),
                               settings.redis_timeout_seconds)
        runtime = Runtime(settings, tenants, redis, Limiter(redis, settings.hold_seconds),
                          Upstreams(settings), load_price_book(settings.price_table),
                          metrics=Metrics(settings.metrics_max_tenants),
                          gate=SaturationGate(settings.max_in_flight,
                                              settings.saturation_wait_seconds),
                          local_limits=LocalLimits(settings.expected_replicas))
        app.state.runtime = runtime
        app.state.rag = rag = Rag.build(settings, tenants, registry=DocumentRegistry(
            redis, runtime.failures, runtime.log_throttle))
        tasks: list[asyncio.Task[None]] = []
        if settings.spool_dir is not None:
            runtime.spool = SettlementSpool(settings.spool_dir)
            runtime.spool.adopt_orphans()
            tasks.append(asyncio.create_task(runtime.spool.keep_replaying(
                runtime.limiter, settings.spool_replay_seconds)))
        if settings.config_source == "kubernetes":
            app.state.kube_source = KubeSource(settings.kube_namespace, tenants)
            tasks.append(asyncio.create_task(app.state.kube_source.run()))
        elif settings.tenants_dir is not None:
            source = DirectorySource(settings.tenants_dir, tenants)
            source.sync()
            tasks.append(asyncio.create_task(source.watch(settings.config_poll_seconds)))
        elif store is not None:
            tenants.loaded = True
        stream_redis: StreamRedis | None = None
        if settings.database_url is not None:
            stream_redis = StreamRedis.from_url(settings.redis_url.get_secret_value())
            writer = runtime.writer = UsageWriter(
                stream_redis, settings.database_url.get_secret_value(), tenants,
                settings.replica_name, settings.usage_batch)
            tasks.append(asyncio.create_task(writer.run(settings.usage_flush_seconds)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if stream_redis is not None:
                await stream_redis.aclose()
            if runtime.background:
                await asyncio.wait(runtime.background, timeout=5)
            await runtime.upstreams.aclose()
            await redis.aclose()
            await rag.aclose()

    app = RuntimeApp(title="Tenantry runtime", lifespan=lifespan, openapi_url="/openapi.json",
                     docs_url=None, redoc_url=None)
    describe_openapi(app)

    def runtime_of(request: Request) -> Runtime:
        runtime: Runtime = request.app.state.runtime
        return runtime

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> Response:
        return error_response(error, getattr(request.state, "request_id", None))

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, error: HTTPException) -> Response:
        message = "Not found." if error.status_code == 404 else str(error.detail)
        return error_response(ApiError(kind_for_status(error.status_code), message,
                                       status=error.status_code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError) -> Response:
        return error_response(ApiError("invalid_request_error", str(error.errors()[:3])))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path, exc_info=error)
        return error_response(ApiError("api_error", "Internal error."),
                              getattr(request.state, "request_id", None))

    messages_route = app.hot_routes["/v1/messages"] = hot_route(app, serve_messages)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await serve_with_fastapi(messages_route, request)

    from .documents import router as documents_router  # imports this module: not at the top
    app.include_router(documents_router)

    count_route = app.hot_routes["/v1/messages/count_tokens"] = hot_route(
        app, serve_count_tokens)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        return await serve_with_fastapi(count_route, request)

    app.include_router(usage_router(lambda request: admitted_caller(runtime_of(request), request),
                                    lambda request: runtime_of(request).settings))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        runtime = runtime_of(request)
        check_metrics_token(runtime.settings, request)
        store = runtime.store
        revisions = {tenant: record.config.revision for tenant in store.tenants()
                     if (record := store.get(tenant)) is not None}
        writer_failures = runtime.writer.failures if runtime.writer is not None else {}
        body = runtime.metrics.render(
            revisions=revisions, failures=merged(runtime.failures, writer_failures),
            refused=store.refused, stale_ignored=store.stale_ignored,
            in_flight=sum(runtime.in_flight.values()), waiting=runtime.gate.waiting,
            redactions=request.app.state.rag.sanitizer.redactions)
        return Response(body, media_type=CONTENT_TYPE)

    def model_info(model: str) -> dict[str, Any]:
        return {"type": "model", "id": model, "display_name": model,
                "created_at": "2025-01-01T00:00:00Z"}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        caller = authenticate(runtime_of(request), request)
        model = caller.config.model
        return JSONResponse({"data": [model_info(model)], "has_more": False,
                             "first_id": model, "last_id": model})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> Response:
        caller = authenticate(runtime_of(request), request)
        if model_id != caller.config.model:
            raise ApiError("not_found_error", f"model: {model_id}")
        return JSONResponse(model_info(model_id))

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    async def check_dependencies(runtime: Runtime) -> list[str]:
        problems = []
        try:
            await runtime.redis.execute("PING")
        except REDIS_ERRORS as error:
            problems.append(f"redis: {error}")
        if runtime.settings.database_url is not None:
            try:
                await asyncio.to_thread(database_answers,
                                        runtime.settings.database_url.get_secret_value())
            except psycopg.Error as error:
                problems.append(f"postgres: {type(error).__name__}")
        return problems

    # /readyz needs no key and opens a Postgres connection: callers arriving while a check
    # runs share it, so a flood of them cannot take the database's connection slots (or the
    # worker's threads) from the tenants.
    dependency_check = SingleFlight[list[str]]()

    async def readiness(request: Request, dependencies: bool) -> Response:
        runtime = runtime_of(request)
        problems = [] if runtime.store.loaded else ["tenant configs not loaded"]
        if dependencies:
            problems += await dependency_check.run(lambda: check_dependencies(runtime))
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "tenants": len(runtime.store.tenants())})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        """Tenant records loaded, Redis answers, and Postgres when configured."""
        return await readiness(request, dependencies=True)

    @app.get("/readyz/local")
    async def readyz_local(request: Request) -> Response:
        """Tenant records loaded: what this replica needs of itself. The chart's readiness
        probe: every replica shares Redis and Postgres, so taking all of them out of the
        Service during their outage would turn the degraded service (fail-open tenants on
        local limits, chat while Postgres is away) into none."""
        return await readiness(request, dependencies=False)

    return app


def run_with_uvicorn(settings: RuntimeSettings, host: str, port: int,
                     on_app: Callable[[FastAPI], None] | None = None) -> None:
    import uvicorn

    app = create_app(settings)
    if on_app is not None:
        on_app(app)
    from .serving import CoalescingHttpToolsProtocol

    # No X-Forwarded-* rewriting (proxy_headers): nothing reads the client's address, and it
    # is one more middleware on every request.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                http=CoalescingHttpToolsProtocol, proxy_headers=False)
