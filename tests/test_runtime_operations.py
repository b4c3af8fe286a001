"""Operating the runtime: /metrics, Redis down (fail closed / open, per-replica share, spool),
saturation (plan tiers first), count_tokens limits, slow upstream, and a fuzz of the HTTP API
from its OpenAPI description, against redis-server, the stub and the official SDK."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from db_helpers import connect, scratch_database
from runtime_helpers import (
    MODEL,
    UPSTREAM_KEY,
    RuntimeServer,
    serve,
    start_redis_on,
    usage_events,
    wait_for,
)
from tenantry_devenv.processes import free_port
from tenantry_devenv.services import Postgres
from tenantry_runtime.contracts.database import migrate
from tenantry_runtime.limits import limit_keys
from tenantry_runtime.local_limits import LocalLimits, LogThrottle
from tenantry_runtime.metrics import TenantLabels
from tenantry_runtime.saturation import SaturationGate
from tenantry_runtime.upstream_stub import StubState, create_stub_app
from usage_helpers import running_app, runtime_of

pytestmark = pytest.mark.timeout(180)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name + ("{" + wanted + "}" if labels else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture
def slow_stub() -> Iterator[tuple[str, StubState]]:
    state = StubState(api_key=UPSTREAM_KEY)
    with serve(create_stub_app(state)) as url:
        yield url, state


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_per_tenant_with_a_bounded_tenant_label(
        redis_server: Any, upstream_stub: tuple[str, object], tmp_path: Path) -> None:
    with running_app(tmp_path, redis_server.url, upstream_stub[0], None,
                     metrics_max_tenants=1) as app:
        app.server.add_tenant("metfirst", limits={"requests_per_minute": 2})
        app.server.add_tenant("metsecond")
        app.call("metfirst", "one")
        app.call("metfirst", "two", stream=True)
        with pytest.raises(anthropic.RateLimitError):
            app.call("metfirst", "three")
        app.call("metsecond", "counted under other")
        app.server.write_raw("metbroken", b"{not json")
        wait_for(lambda: app.server.store.refused["invalid"], 10, "the refusal")
        scraped = httpx.get(f"{app.server.url}/metrics", timeout=10)
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = scraped.text
    assert sample(text, "tenantry_runtime_requests_total", tenant="metfirst",
                  status="200") == 2
    assert sample(text, "tenantry_runtime_requests_total", tenant="metfirst",
                  status="429") == 1
    assert sample(text, "tenantry_runtime_rejections_total", tenant="metfirst",
                  reason="requests_per_minute") == 1
    assert sample(text, "tenantry_runtime_requests_total", tenant="other", status="200") == 1
    assert "metsecond" not in text  # beyond the cap: aggregated
    events = usage_events(redis_server.url, "metfirst")
    inputs = sum(e["input_tokens"] for e in events)
    assert sample(text, "gen_ai_client_token_usage_sum", tenant="metfirst",
                  gen_ai_request_model=MODEL, gen_ai_token_type="input") == inputs
    assert sample(text, "gen_ai_client_token_usage_count", tenant="metfirst",
                  gen_ai_request_model=MODEL, gen_ai_token_type="output") == 2
    assert sample(text, "gen_ai_server_request_duration_seconds_count", tenant="metfirst",
                  gen_ai_request_model=MODEL) == 2
    assert sample(text, 'gen_ai_server_request_duration_seconds_bucket', tenant="metfirst",
                  gen_ai_request_model=MODEL, le="+Inf") == 2
    cost = sample(text, "tenantry_runtime_cost_total", tenant="metfirst", currency="USD")
    assert cost == pytest.approx(sum(float(e["cost"]) for e in events))
    assert sample(text, "tenantry_runtime_config_revision", tenant="metfirst") == 1
    assert sample(text, "tenantry_runtime_config_refused_total", reason="invalid") == 1
    assert sample(text, "tenantry_runtime_in_flight") == 0


def test_metrics_need_the_token_when_one_is_set(
        redis_server: Any, upstream_stub: tuple[str, object], tmp_path: Path) -> None:
    with running_app(tmp_path, redis_server.url, upstream_stub[0], None,
                     metrics_token="scrape-me") as app:
        app.server.add_tenant("mettoken")
        url = f"{app.server.url}/metrics"
        for headers in ({}, {"authorization": "Bearer wrong"},
                        {"x-api-key": app.server.keys["mettoken"]["main"]}):
            refused = httpx.get(url, headers=headers, timeout=10)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["type"] == "authentication_error"
        scraped = httpx.get(url, headers={"authorization": "Bearer scrape-me"}, timeout=10)
        assert scraped.status_code == 200
        assert "tenantry_runtime_config_revision" in scraped.text


def test_local_share_buckets_and_log_throttle() -> None:
    limits = LocalLimits(replicas=3)
    assert limits.admit("t", None, 1, now=0.0) is not None  # limits never seen: refuse
    # 60/min over 3 replicas: 20 at once, then one every 3 s.
    assert [limits.admit("t", (60, 1000), 1, now=0.0) is None for _ in range(21)] == \
        [True] * 20 + [False]
    assert limits.admit("t", (60, 1000), 1, now=2.9) is not None
    assert limits.admit("t", (60, 1000), 1, now=3.1) is None
    refused = limits.admit("t", (60, 1000), 400, now=3.1)  # over the 333 tokens/min share
    assert refused is not None and refused.status == 400
    throttle = LogThrottle(seconds=10)
    assert [throttle.due("k", now) for now in (0, 1, 2, 10.5, 11)] == [0, None, None, 2, None]


async def test_a_waiter_that_leaves_gives_its_slot_on() -> None:
    gate = SaturationGate(capacity=1, wait_seconds=5)
    await gate.acquire(0)
    leaving = asyncio.create_task(gate.acquire(5))
    staying = asyncio.create_task(gate.acquire(0))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.sleep(0.01)
    gate.release()
    await asyncio.wait_for(staying, 1)
    assert gate.in_use == 1 and gate.waiting == 0
    gate.release()
    assert gate.in_use == 0


def test_tenant_labels_keep_their_first_come_owners() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "c")] == ["a", "b", "other", "a", "other"]


# --- Redis down -------------------------------------------------------------------------------


def test_redis_down_budgets_fail_closed_unless_allowed_and_rate_limits_go_local(
        upstream_stub: tuple[str, object], tmp_path: Path) -> None:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis = start_redis_on(port, tmp_path / "redis-a")
    with running_app(tmp_path, redis_url, upstream_stub[0], None, expected_replicas=2,
                     spool_dir=tmp_path / "spool", spool_replay_seconds=0.2) as app:
        runtime = runtime_of(app)
        app.server.add_tenant("downopen", limits={"requests_per_minute": 6})
        app.server.write(app.server.record("downopen").model_copy(
            update={"budget_fail_open": True}))
        app.server.add_tenant("downclosed")
        for tenant in ("downopen", "downclosed"):
            app.call(tenant, "learn the limits while Redis answers")
        redis.stop()
        # Fail closed (the default): 503, the SDK may retry.
        with pytest.raises(anthropic.InternalServerError) as closed:
            app.call("downclosed", "refused")
        assert closed.value.status_code == 503
        # Fail open: this replica's share of 6/min over 2 replicas is 3, then 429.
        answered = [app.call("downopen", f"local {n}") for n in range(3)]
        with pytest.raises(anthropic.RateLimitError):
            app.call("downopen", "over the local share")
        # count_tokens has no budget: it falls back to the local share for every tenant.
        counted = app.client("downclosed").messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert counted.input_tokens > 0
        text = httpx.get(f"{app.server.url}/metrics", timeout=10).text
        assert sample(text, "tenantry_runtime_limits_fallback_total", tenant="downopen",
                      outcome="admitted") == 3
        assert sample(text, "tenantry_runtime_limits_fallback_total", tenant="downopen",
                      outcome="refused") == 1
        assert sample(text, "tenantry_runtime_limits_fallback_total", tenant="downclosed",
                      outcome="closed") == 1
        # Every admission that found Redis away: 1 closed, 4 on the local share, 1 count.
        assert sample(text, "tenantry_runtime_failures_total", reason="admit_redis_error") == 6
        assert runtime.spool is not None and runtime.spool.pending() == 3
        # Redis returns (empty: no persistence): the spooled settlements replay.
        redis = start_redis_on(port, tmp_path / "redis-b")
        try:
            wait_for(lambda: runtime.spool is not None and runtime.spool.pending() == 0, 15,
                     "the spool to replay")
            assert sorted(e["request_id"] for e in usage_events(redis_url, "downopen")) == \
                sorted(answered)
        finally:
            redis.stop()


# --- saturation, slow upstream ----------------------------------------------------------------


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` on the event loop until it holds; a test failure after 20 s."""
    async with asyncio.timeout(20):
        while not condition():  # noqa: ASYNC110 - the gate exposes counters, not events
            await asyncio.sleep(0.02)


async def test_under_saturation_higher_plan_tiers_are_admitted_first(
        redis_server: Any, slow_stub: tuple[str, StubState], tmp_path: Path) -> None:
    url, stub = slow_stub
    # Long enough that the queue forms while the first request is upstream, however slow the
    # machine; the test waits on the gate's own counters rather than on sleeps.
    stub.delay_seconds = 3.0
    with running_app(tmp_path, redis_server.url, url, None, max_in_flight=1,
                     saturation_wait_seconds=10) as app:
        app.server.add_tenant("satfree")
        app.server.add_tenant("satenterprise")
        app.server.write(app.server.record("satenterprise").model_copy(
            update={"plan_tier": 2}))
        finished: list[str] = []

        async def ask(tenant: str, label: str) -> None:
            client = anthropic.AsyncAnthropic(base_url=app.server.url,
                                              api_key=app.server.keys[tenant]["main"],
                                              max_retries=0, timeout=30)
            await client.messages.create(model=MODEL, max_tokens=8, messages=[
                {"role": "user", "content": label}])
            finished.append(label)
            await client.close()

        gate = runtime_of(app).gate
        first = asyncio.create_task(ask("satfree", "free-1"))
        await until(lambda: gate.in_use == 1)
        queued = [asyncio.create_task(ask("satfree", f"free-{n}")) for n in (2, 3)]
        await until(lambda: gate.waiting == 2)
        enterprise = asyncio.create_task(ask("satenterprise", "enterprise"))
        await until(lambda: gate.waiting == 3)
        assert not first.done()
        stub.delay_seconds = 0.2
        await asyncio.gather(first, *queued, enterprise)
        # The enterprise request came last but went first when the slot freed.
        assert finished == ["free-1", "enterprise", "free-2", "free-3"]

        # Waiting longer than saturation_wait_seconds: 529 overloaded_error, nothing held.
        gate.wait_seconds = 0.2
        stub.delay_seconds = 1.0
        busy = asyncio.create_task(ask("satfree", "busy"))
        await until(lambda: gate.in_use == 1)
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            await ask("satenterprise", "turned away")
        assert overloaded.value.status_code == 529
        assert overloaded.value.body["error"]["type"] == "overloaded_error"
        assert overloaded.value.response.headers["retry-after"] == "1"
        await busy
        text = (await asyncio.to_thread(httpx.get, f"{app.server.url}/metrics")).text
        assert sample(text, "tenantry_runtime_rejections_total", tenant="satenterprise",
                      reason="overloaded") == 1
        assert runtime_of(app).gate.in_use == 0 and runtime_of(app).in_flight == {}


def test_a_slow_or_absent_upstream_gives_anthropic_errors_and_releases_everything(
        redis_server: Any, slow_stub: tuple[str, StubState], tmp_path: Path) -> None:
    url, stub = slow_stub
    stub.delay_seconds = 1.0
    with running_app(tmp_path, redis_server.url, url, None, upstream_retries=0,
                     upstream_read_timeout_seconds=0.3) as app:
        app.server.add_tenant("slowup")
        with pytest.raises(anthropic.APIStatusError) as slow:
            app.call("slowup", "too slow")
        assert slow.value.status_code == 504
        assert slow.value.body["error"]["type"] == "api_error"
        text = httpx.get(f"{app.server.url}/metrics", timeout=10).text
        assert sample(text, "tenantry_runtime_upstream_errors_total", tenant="slowup",
                      status="504") == 1
        runtime = runtime_of(app)
        assert runtime.in_flight == {} and runtime.gate.in_use == 0
        held = app.server.redis_client().get(
            limit_keys("slowup", datetime.now(UTC)).held_total)
        assert int(held or 0) == 0
    with running_app(tmp_path, redis_server.url, f"http://127.0.0.1:{free_port()}", None,
                     upstream_retries=0) as app:
        app.server.add_tenant("downup")
        with pytest.raises(anthropic.APIStatusError) as down:
            app.call("downup", "nobody there")
        assert down.value.status_code == 502
        held = app.server.redis_client().get(
            limit_keys("downup", datetime.now(UTC)).held_total)
        assert int(held or 0) == 0
        assert [e["status"] for e in usage_events(redis_server.url, "downup")] == [502]


# --- count_tokens -----------------------------------------------------------------------------


def test_count_tokens_is_rate_limited_but_not_budgeted(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("ctlimits", limits={"requests_per_minute": 2,
                                                        "daily_tokens": 1})["main"]
    client = anthropic.Anthropic(base_url=runtime_server.url, api_key=key, max_retries=0)
    messages: Any = [{"role": "user", "content": "how many"}]
    # The daily budget (1 token) refuses any message, but counting costs no tokens.
    with pytest.raises(anthropic.RateLimitError) as budget:
        client.messages.create(model=MODEL, max_tokens=8, messages=messages)
    assert "budget" in budget.value.body["error"]["message"]
    for _ in range(2):
        assert client.messages.count_tokens(model=MODEL, messages=messages).input_tokens > 0
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.count_tokens(model=MODEL, messages=messages)
    assert "Requests per minute" in limited.value.body["error"]["message"]
    # No hold was taken for a count.
    held = runtime_server.redis_client().get(
        limit_keys("ctlimits", datetime.now(UTC)).held_total)
    assert int(held or 0) == 0


# --- fuzzing ----------------------------------------------------------------------------------


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased toward the shapes and edges the API parses."""
    choices: list[Any] = [
        None, True, -1, 0, 2**63, 1e308, "", "x" * rng.randint(0, 300), "\u0000\ud7ff",
        MODEL, "user", "assistant", [], {},
    ]
    if depth < 3:
        choices += [
            {"model": junk(rng, depth + 1), "max_tokens": junk(rng, depth + 1),
             "messages": junk(rng, depth + 1), "stream": junk(rng, depth + 1)},
            [{"role": junk(rng, depth + 1), "content": junk(rng, depth + 1)}],
            [{"type": "text", "text": junk(rng, depth + 1)}],
            {"system": junk(rng, depth + 1), "metadata": junk(rng, depth + 1)},
        ]
    return rng.choice(choices)


def fuzz_bodies(rng: random.Random) -> Iterator[bytes]:
    yield b""
    yield b"{"
    yield b"\xff\xfe"
    yield b"[]" * 1000
    yield b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1e999, "messages": []}'
    for _ in range(60):
        value = junk(rng)
        if isinstance(value, dict) and rng.random() < 0.7:
            value = {"model": MODEL, "max_tokens": rng.choice([1, 8, 0, -5, "8", 10**9]),
                     "messages": [{"role": "user", "content": "hi"}], **value}
        yield json.dumps(value).encode()


def test_fuzzing_every_route_of_the_openapi_description_never_gives_a_5xx(
        redis_server: Any, upstream_stub: tuple[str, object], postgres: Postgres,
        tmp_path: Path) -> None:
    """Seeded random bodies, query strings and headers against every route the app's
    /openapi.json describes (schemathesis and hypothesis are not in the venv)."""
    with scratch_database(postgres, "fuzz") as name:
        with connect(postgres, name) as conn:
            migrate(conn, "tenantry")
        with running_app(tmp_path, redis_server.url, upstream_stub[0],
                         postgres.dsn(name)) as app:
            fuzz(app.server, app.server.add_tenant("fuzzer")["main"])


def fuzz(runtime_server: RuntimeServer, key: str) -> None:
    spec = httpx.get(f"{runtime_server.url}/openapi.json", timeout=10).json()
    rng = random.Random(7)
    header_sets: list[dict[str, str | bytes]] = [
        {}, {"x-api-key": key}, {"x-api-key": key, "content-type": "text/plain"},
        {"authorization": f"Bearer {key}"}, {"x-api-key": "sk-tnt-" + "a" * 200},
        {"x-api-key": key, "anthropic-version": b"\xff" * 3},
        {"x-api-key": key, "anthropic-beta": ",,\u0001,"},
    ]
    queries = [{}, {"from": "2026-01-01"}, {"from": "x", "to": "\u0000"},
               {"from": "9999-12-31", "to": "0001-01-01"}, {"to": "2026-02-30"}]
    tried = 0
    started = time.monotonic()
    with httpx.Client(base_url=runtime_server.url, timeout=30) as client:
        for path, operations in spec["paths"].items():
            concrete = re.sub(r"\{[^}]+\}", lambda _: rng.choice(["x", MODEL, "%00", "..", "9"
                                                                  * 300]), path)
            for method in operations:
                bodies = list(fuzz_bodies(rng)) if method == "post" else [b""]
                for body in bodies:
                    headers = rng.choice(header_sets)
                    response = client.request(method.upper(), concrete, content=body,
                                              headers=headers, params=rng.choice(queries))
                    tried += 1
                    assert response.status_code < 500, (method, concrete, body[:200],
                                                        headers, response.text[:300])
                    # (uvicorn itself answers a malformed header with a plain-text 400)
                    if response.status_code >= 400 and response.headers.get(
                            "content-type") == "application/json":
                        assert response.json()["type"] == "error"
    assert tried > 100 and {"/v1/messages", "/v1/usage", "/metrics"} <= set(spec["paths"])
    assert time.monotonic() - started < 120

