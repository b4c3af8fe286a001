"""A hostile tenant with a valid key against the runtime (adversarial review, rtattack).

Each test here failed against the code before its fix. The angles test_attack.py (the data
plane), test_runtime_api.py and the schemathesis fuzzing already cover are not repeated.
A "dedicated endpoint" below is a real HTTP server answering what a broken or hostile model
endpoint could answer: the runtime must not trust its usage figures or its JSON.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from pydantic import SecretStr
from runtime_helpers import (
    MODEL,
    UPSTREAM_KEY,
    RuntimeServer,
    serve,
    usage_events,
    wait_for,
    write_limits,
)
from tenantry_runtime.app import create_app
from tenantry_runtime.contracts.runtime_config import Endpoint
from tenantry_runtime.errors import ApiError
from tenantry_runtime.limits import limit_keys
from tenantry_runtime.messages import check_fields_once
from tenantry_runtime.metering import usage_rows
from tenantry_runtime.serving import CoalescingHttpToolsProtocol
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.store import TenantStore
from tenantry_runtime.usage import usage_window
from test_runtime_rag import World
from test_runtime_rag import world as rag_world

pytestmark = pytest.mark.timeout(120)

NESTED = 50_000  # far below max_body_bytes (64 KiB in the fixture), far above the parser's depth


def nested_content() -> str:
    return "[" * NESTED + "]" * NESTED


class HostileEndpoint:
    """A model endpoint whose next answers are set by the test: (status, body bytes)."""

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] = (200, b"{}")
        self.delay = 0.0  # seconds before answering
        # An SSE answer instead: these events, then silence for `hang` seconds.
        self.events: list[bytes] | None = None
        self.hang = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        status, body = self.answer
        await asyncio.sleep(self.delay)
        if self.events is not None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await asyncio.sleep(self.hang)
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def hostile_endpoint() -> Iterator[tuple[str, HostileEndpoint]]:
    endpoint = HostileEndpoint()
    with serve(endpoint) as url:
        yield url, endpoint


def message_with_usage(usage: dict[str, int]) -> bytes:
    return json.dumps({"id": "msg_x", "type": "message", "role": "assistant", "model": MODEL,
                       "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": usage}).encode()


def dedicated_tenant(server: RuntimeServer, tenant: str, url: str) -> str:
    mine = Endpoint(type="dedicated", url=url, secret_name="s", secret_key="k")
    return server.add_tenant(tenant, endpoint=mine, endpoint_api_key=UPSTREAM_KEY)["main"]


def post_message(server: RuntimeServer, key: str, content: Any = "hello") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": key}, timeout=30,
                      json={"model": MODEL, "max_tokens": 16,
                            "messages": [{"role": "user", "content": content}]})


# --- deeply nested JSON -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_deeply_nested_json_is_refused_as_the_callers_error(
        runtime_server: RuntimeServer, path: str) -> None:
    # 40 KB of brackets made json.loads raise RecursionError: a 500 "Internal error" and a
    # logged traceback per request, which any tenant could repeat at its rate limit.
    key = runtime_server.add_tenant("hostnest")["main"]
    content = "[" * 20_000 + "]" * 20_000  # 40 KB
    body = (f'{{"model": "{MODEL}", "max_tokens": 16, '
            f'"messages": [{{"role": "user", "content": {content}}}]}}').encode()
    answer = httpx.post(f"{runtime_server.url}{path}", content=body, timeout=30,
                        headers={"x-api-key": key, "content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "nested" in error["message"]


def test_an_endpoints_nested_answer_releases_the_tenants_slot(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint]) -> None:
    # The answer's usage was parsed between admission and settlement; its RecursionError
    # skipped the settlement: the hold, the tenant's in-flight slot and the replica's
    # saturation slot were never released (the tenant's cap reached, every tenant's
    # saturation gate shrinking by one per such answer).
    url, endpoint = hostile_endpoint
    key = dedicated_tenant(runtime_server, "hostnestup", url)
    endpoint.answer = (200, b'{"usage": ' + nested_content().encode() + b"}")
    post_message(runtime_server, key)
    runtime = runtime_server.app.state.runtime
    assert runtime.in_flight["hostnestup"] == 0
    held = runtime_server.redis_client().get(
        limit_keys("hostnestup", datetime.now(UTC)).held_total)
    assert int(held or 0) == 0
    assert len(usage_events(runtime_server.redis_url, "hostnestup")) == 1


# --- what the runtime checks is what the endpoint reads ----------------------------------------


@pytest.mark.parametrize("fields", [
    '"model": "claude-elsewhere", "model": "{model}", "max_tokens": 16',
    '"model": "claude-elsewhere", "mod\\u0065l": "{model}", "max_tokens": 16',
    '"model": "{model}", "max_tokens": 100000000, "max_tokens": 16',
    '"model": "{model}", "max_tokens": 16, "stream": true, "str\\u0065am": false',
])
def test_a_repeated_field_is_refused_not_read_two_ways(
        runtime_server: RuntimeServer, fields: str) -> None:
    # The runtime checks its parse (Python keeps the last of repeated keys) and forwards the
    # bytes: an endpoint whose parser keeps the first would run a model, max_tokens or
    # stream that was never checked (the last value is the one that passes the checks).
    key = runtime_server.add_tenant("hostrepeat")["main"]
    body = ("{" + fields.format(model=MODEL)
            + ', "messages": [{"role": "user", "content": "which model?"}]}')
    answer = httpx.post(f"{runtime_server.url}/v1/messages", content=body.encode(),
                        headers={"x-api-key": key, "content-type": "application/json"},
                        timeout=30)
    assert answer.status_code == 400, (body, answer.text)
    assert "more than once" in answer.json()["error"]["message"]


def test_escapes_and_repeated_names_inside_messages_still_pass(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("hostescape")["main"]
    content = [{"type": "text", "text": "caf\u00e9 \"model\" é"},
               {"type": "text", "text": json.dumps({"model": 1, "max_tokens": 2})}]
    answer = httpx.post(f"{runtime_server.url}/v1/messages", timeout=30,
                        headers={"x-api-key": key}, json={
                            "model": MODEL, "max_tokens": 16, "metadata": {"model": "x"},
                            "messages": [{"role": "user", "content": content}]})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(("body", "refused"), [
    (rb'{"model": "a", "model": "b"}', "model"),
    (b'{"\\u006d\\u006f\\u0064\\u0065\\u006c" \n\t : "a", "model": "b"}', "model"),
    (rb'{"max_tokens": 1, "max_tok\u0065ns"  :  2}', "max_tokens"),
    (rb'{"model": "a", "messages": [{"content": "caf\u00e9 \"model\": x"}], "m": {"model": 1}}',
     None),
    (rb'{"model": "a", "x\u00e9": 1, "y": "\u00e9\u00e9"}', None),
])
def test_fields_given_twice_are_found_however_they_are_spelled(body: bytes,
                                                               refused: str | None) -> None:
    """The screen in front of the exact check (one scan for names written twice, one for keys
    with escapes) never lets a repeat through; a repeat only nested or in text passes."""
    if refused is None:
        check_fields_once(body)
        return
    with pytest.raises(ApiError, match=refused):
        check_fields_once(body)


# --- usage figures an endpoint reports --------------------------------------------------------


def test_negative_usage_from_an_endpoint_does_not_cancel_the_charge(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint]) -> None:
    url, endpoint = hostile_endpoint
    key = dedicated_tenant(runtime_server, "hostneg", url)
    endpoint.answer = (200, message_with_usage({"input_tokens": -1_000_000,
                                                "output_tokens": 300}))
    assert post_message(runtime_server, key).status_code == 200
    spent = runtime_server.redis_client().get(limit_keys("hostneg", datetime.now(UTC)).day)
    # The 300 tokens written are charged; -1,000,000 read made the charge 0 (budget bypass).
    assert int(spent or 0) == 300
    [event] = usage_events(runtime_server.redis_url, "hostneg")
    assert (event["input_tokens"], event["output_tokens"]) == (0, 300)
    # And the event is one the usage writer can store (ai_usage_logs CHECKs tokens >= 0):
    # a negative count failed its batch forever, and every later event of the tenant with it.
    rows, bad = usage_rows("hostneg", [(b"1-0", {b"request_id": event["request_id"].encode(),
                                                 b"event": json.dumps(event).encode()})])
    assert (len(rows), bad) == (1, [])


def test_absurd_usage_from_an_endpoint_is_capped_not_a_poisoned_settlement(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint]) -> None:
    url, endpoint = hostile_endpoint
    key = dedicated_tenant(runtime_server, "hosthuge", url)
    endpoint.answer = (200, message_with_usage({"input_tokens": 10, "output_tokens": 10**30}))
    assert post_message(runtime_server, key).status_code == 200
    runtime = runtime_server.app.state.runtime
    # 10**30 made settle.lua's INCRBY fail: the settlement went to the spool (or was lost)
    # and its replay failed the same way every time.
    [event] = usage_events(runtime_server.redis_url, "hosthuge")
    assert 0 < event["output_tokens"] < 2**53
    spent = runtime_server.redis_client().get(limit_keys("hosthuge", datetime.now(UTC)).day)
    assert int(spent or 0) == 10 + event["output_tokens"]
    assert runtime.in_flight["hosthuge"] == 0


@pytest.mark.parametrize("tokens", [-1, 2**63])
def test_the_usage_writer_drops_an_event_postgres_would_refuse(tokens: int) -> None:
    # Events already in Redis (written before the cap) must not block the tenant's stream.
    event = {"request_id": "req_1", "tenant": "t", "model": MODEL,
             "at": "2026-11-28T00:00:00+00:00", "input_tokens": tokens, "output_tokens": 1,
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    rows, bad = usage_rows("t", [(b"1-0", {b"request_id": b"req_1",
                                           b"event": json.dumps(event).encode()})])
    assert (rows, bad) == ([], [b"1-0"])


def test_sdk_still_works_for_an_honest_dedicated_endpoint(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint]) -> None:
    url, endpoint = hostile_endpoint
    key = dedicated_tenant(runtime_server, "hosthonest", url)
    endpoint.answer = (200, message_with_usage({"input_tokens": 7, "output_tokens": 3}))
    client = anthropic.Anthropic(base_url=runtime_server.url, api_key=key, max_retries=0)
    message = client.messages.create(model=MODEL, max_tokens=16,
                                     messages=[{"role": "user", "content": "hi"}])
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 3)
    spent = runtime_server.redis_client().get(limit_keys("hosthonest", datetime.now(UTC)).day)
    assert int(spent or 0) == 10


# --- /v1/usage dates --------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), [(None, "0001-01-05"), ("9999-12-01", "9999-12-31")])
def test_usage_dates_at_the_calendars_edges_are_the_callers_error(
        start: str | None, end: str) -> None:
    with pytest.raises(ApiError) as caught:
        usage_window(start, end, datetime.now(UTC).date()).bounds()
    assert caught.value.status == 400


def test_usage_before_the_first_day_is_a_400_over_http(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("hostdates")["main"]
    answer = httpx.get(f"{runtime_server.url}/v1/usage", params={"to": "0001-01-05"},
                       headers={"x-api-key": key}, timeout=30)
    assert answer.status_code == 400, answer.text


# --- tokens/min -------------------------------------------------------------------------------


def test_tokens_beyond_the_reservation_count_against_tokens_per_minute(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint]) -> None:
    # A 200-byte body can make the model read 100,000 tokens (a PDF or image by URL, web
    # fetch results). Admission charges tokens/min the reservation (body bytes / 3 +
    # max_tokens); the settlement only gave unused tokens back, so such requests passed a
    # tokens/min limit at the requests/min rate. A dedicated endpoint stands in for the model.
    url, endpoint = hostile_endpoint
    mine = Endpoint(type="dedicated", url=url, secret_name="s", secret_key="k")
    key = runtime_server.add_tenant("hosttpm", endpoint=mine, endpoint_api_key=UPSTREAM_KEY,
                                    limits={"tokens_per_minute": 10_000})["main"]
    endpoint.answer = (200, message_with_usage({"input_tokens": 50_000, "output_tokens": 10}))
    assert post_message(runtime_server, key).status_code == 200
    refused = post_message(runtime_server, key)
    assert refused.status_code == 429, refused.text
    # 40,010 tokens beyond the minute's burst: about four minutes at 10,000 a minute.
    assert 3 * 60 < int(refused.headers["retry-after"]) <= 5 * 60


# --- the documents API ------------------------------------------------------------------------

world = rag_world  # test_runtime_rag's: pool tenants a, b with collections, Postgres, MiniLM


def test_the_documents_api_is_rate_limited(world: World) -> None:
    # /v1/documents and /v1/search embed (CPU on the replica, or a paid embeddings API) and
    # query Postgres, and answered any number of requests: requests/min never applied.
    write_limits(world.server.redis_url, world.a, requests_per_minute=2)
    with world.http(world.a) as client:
        assert [client.get("/v1/documents").status_code for _ in range(2)] == [200, 200]
        for answer in (client.post("/v1/search", json={"query": "budgets"}),
                       client.post("/v1/documents", json={"text": "a document"}),
                       client.get("/v1/documents")):
            assert answer.status_code == 429, answer.text
            assert answer.json()["error"]["type"] == "rate_limit_error"
            assert int(answer.headers["retry-after"]) >= 1
    with world.http(world.b) as client:  # another tenant's limit is its own
        assert client.post("/v1/search", json={"query": "budgets"}).status_code == 200


def test_usage_reads_are_rate_limited(runtime_server: RuntimeServer) -> None:
    # GET /v1/usage aggregates up to 366 days of the tenant's rows, at any rate before.
    key = runtime_server.add_tenant("hostusage", limits={"requests_per_minute": 2})["main"]
    statuses = [httpx.get(f"{runtime_server.url}/v1/usage", headers={"x-api-key": key},
                          timeout=30).status_code for _ in range(3)]
    # This runtime records no usage (503); the third is refused before that is found.
    assert statuses == [503, 503, 429]


async def test_count_tokens_stays_within_the_tenants_concurrent_requests(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint]) -> None:
    # count_tokens took no slot of the tenant's concurrency cap: while the endpoint was slow,
    # one tenant could hold every upstream connection (shared by all tenants) with it.
    url, endpoint = hostile_endpoint
    key = dedicated_tenant(runtime_server, "hostcount", url)
    record = runtime_server.record("hostcount")
    runtime_server.write(record.model_copy(update={"max_concurrent_requests": 2}))
    endpoint.answer, endpoint.delay = (200, b'{"input_tokens": 5}'), 1.0
    try:
        async with httpx.AsyncClient(base_url=runtime_server.url, timeout=30,
                                     headers={"x-api-key": key}) as client:
            answers = await asyncio.gather(*(client.post(
                "/v1/messages/count_tokens", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "count"}]})
                for _ in range(5)))
    finally:
        endpoint.delay = 0.0
    assert sorted(answer.status_code for answer in answers) == [200, 200, 429, 429, 429]
    assert runtime_server.app.state.runtime.in_flight["hostcount"] == 0


# --- the request's head -----------------------------------------------------------------------


def raw_connection(server: RuntimeServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_an_endless_header_is_cut_off_before_anyone_authenticates(
        runtime_server: RuntimeServer) -> None:
    # uvicorn's httptools protocol has no limit on a request's head, and httptools keeps a
    # header's value until it ends: 200 MB of one header grew the worker from 120 to 515 MB
    # (one connection, no key needed).
    sent, limit = 0, 64 * 2**20
    with raw_connection(runtime_server) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-junk: ")
            while sent < limit:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass  # the runtime closed the connection
    assert sent < limit // 2  # what socket buffers took before the close


def test_a_large_head_is_answered_431(runtime_server: RuntimeServer) -> None:
    with raw_connection(runtime_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-junk: " + b"a" * 100_000)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_heads_and_bodies_within_the_limits_still_pass(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("hostheads")["main"]
    padding = {"x-pad": "p" * 40_000}  # with the rest of the head, within 64 KiB
    assert httpx.get(f"{runtime_server.url}/healthz", headers=padding).status_code == 200
    body = json.dumps({"model": MODEL, "max_tokens": 16, "messages": [
        {"role": "user", "content": "b" * 60_000}]}).encode()
    # Two requests with bodies, pipelined in one write: bodies never count as heads.
    request = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + key.encode()
               + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
               + body)
    with raw_connection(runtime_server) as sock:
        sock.sendall(request * 2)
        answers = b""
        deadline = time.monotonic() + 20
        while answers.count(b"HTTP/1.1 200 ") < 2 and time.monotonic() < deadline:
            answers += sock.recv(65536)
    assert answers.count(b"HTTP/1.1 200 ") == 2, answers[:300]



class QuickHeads(CoalescingHttpToolsProtocol):
    head_timeout_seconds = 0.5


@pytest.fixture(scope="module")
def quick_heads_url(runtime_server: RuntimeServer) -> Iterator[str]:
    """The runtime's protocol with a half-second head timeout, on an app of its own."""
    settings = RuntimeSettings(redis_url=SecretStr(runtime_server.redis_url))
    with serve(create_app(settings, TenantStore()), http=QuickHeads) as url:
        yield url


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bytes:
    """What the server sends until it closes the connection, sending `trickle` every
    0.1 s meanwhile; fails when it is still open after `seconds`."""
    sock.settimeout(0.1)
    received, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return received  # reset: closed
        if not data:
            return received
        received += data
    raise AssertionError(f"still open after {seconds}s; received {received[:200]!r}")


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nhost: x\r\n"])
def test_a_connection_without_a_whole_head_is_closed(quick_heads_url: str, sent: bytes) -> None:
    # uvicorn closes an idle connection only after an answer (keep-alive), and any byte
    # resets that: a connection that sent nothing, or a head a byte at a time, stayed open
    # for good (slowloris: a few thousand take every file descriptor of the worker).
    host, port = quick_heads_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(sent)
        answer = closed_within(sock, 5, trickle=b"x-slow: 1\r\n" if sent else b"")
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_an_unread_body_after_a_401_must_end_in_time(quick_heads_url: str) -> None:
    host, port = quick_heads_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000"
                     b"\r\n\r\n{")
        answer = closed_within(sock, 5, trickle=b" ")
    assert answer.startswith(b"HTTP/1.1 401 "), answer


def test_a_slow_but_timely_request_and_keep_alive_still_work(quick_heads_url: str) -> None:
    host, port = quick_heads_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for _ in range(2):  # the second on the same connection (kept alive)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.3)  # the head's rest within the half second
            sock.sendall(b"host: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


# --- /readyz ----------------------------------------------------------------------------------


def postgres_sessions(world: World) -> int:
    """Sessions ever opened to the world's database (counted as they end)."""
    row = world.admin.execute("SELECT sessions FROM pg_stat_database WHERE datname = "
                              "current_database()").fetchone()
    assert row is not None
    return int(row[0])


def settled(read: Callable[[], int]) -> int:
    """`read()` once it has not changed for half a second (sessions count as they end)."""
    last, stable_since = read(), time.monotonic()
    while time.monotonic() - stable_since < 0.5:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


async def test_a_flood_of_readiness_checks_shares_one_database_check(world: World) -> None:
    # /readyz needs no key and opened a Postgres connection per call: anyone could make
    # every replica open connections as fast as it asked, taking the database's connection
    # slots (max_connections) and the workers' threads from every tenant.
    before = settled(lambda: postgres_sessions(world))
    async with httpx.AsyncClient(base_url=world.server.url, timeout=30) as client:
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(60)))
    assert {answer.status_code for answer in answers} == {200}
    opened = settled(lambda: postgres_sessions(world)) - before
    assert opened <= 10, opened


# --- a stream the client leaves ---------------------------------------------------------------


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def test_a_stream_left_mid_answer_is_not_billed_as_one_token(
        runtime_server: RuntimeServer, hostile_endpoint: tuple[str, HostileEndpoint],
        tmp_path: Path) -> None:
    # The client reads the answer, leaves, and the model goes on past
    # abandoned_stream_seconds: the final usage (message_delta) is never read, and the
    # settlement charged message_start's output (1 token) for all the client had read.
    url, endpoint = hostile_endpoint
    settings = RuntimeSettings(
        tenants_dir=tmp_path, config_poll_seconds=0.1,
        redis_url=SecretStr(runtime_server.redis_url), upstream_url=url,
        upstream_api_key=SecretStr(UPSTREAM_KEY), abandoned_stream_seconds=0.5)
    store = TenantStore()
    app = create_app(settings, store)
    delta = sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": "word " * 200}})
    endpoint.events = [sse("message_start", {"type": "message_start", "message": {
        "id": "msg_x", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        *[delta] * 20]
    endpoint.hang = 5.0
    try:
        with serve(app) as runtime_url:
            server = RuntimeServer(runtime_url, tmp_path, runtime_server.redis_url,
                                   runtime_server.stub, store, app)
            key = dedicated_tenant(server, "hostleave", url)
            with httpx.stream("POST", f"{runtime_url}/v1/messages", headers={"x-api-key": key},
                              timeout=30, json={
                                  "model": MODEL, "max_tokens": 900, "stream": True,
                                  "messages": [{"role": "user", "content": "go on"}]}) as answer:
                read = 0
                for chunk in answer.iter_bytes():
                    read += len(chunk)
                    if read > 15_000:
                        break  # the client leaves with most of the text
            wait_for(lambda: usage_events(runtime_server.redis_url, "hostleave"), 10,
                     "the abandoned stream's settlement")
    finally:
        endpoint.events, endpoint.hang = None, 0.0
    [event] = usage_events(runtime_server.redis_url, "hostleave")
    assert event["status"] == 499
    assert (event["input_tokens"], event["output_tokens"]) == (10, 900)

