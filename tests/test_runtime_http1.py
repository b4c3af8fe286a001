"""The upstream HTTP/1.1 client (`http1.py`) and the retries over it (`upstream.py`), against
real local servers: the Messages-API stub under uvicorn, and raw asyncio TCP servers for what
the stub cannot do (reset a connection, close a kept-alive one, end a body at EOF)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from runtime_helpers import MODEL, UPSTREAM_KEY, serve
from tenantry_runtime.errors import ApiError
from tenantry_runtime.http1 import ConnectionBroken, Pool
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.upstream import Endpoint, Upstreams
from tenantry_runtime.upstream_stub import StubState, create_stub_app

HEADERS = {"x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01",
           "content-type": "application/json"}


def body(text: str = "hello there", *, stream: bool = False) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": text}]}).encode()


def pool_for(url: str, *, max_connections: int = 8, read_timeout: float = 10.0) -> Pool:
    return Pool(url, max_connections=max_connections, connect_timeout=5.0,
                read_timeout=read_timeout)


def upstreams(url: str, retries: int) -> tuple[Upstreams, Endpoint]:
    settings = RuntimeSettings(upstream_url=url, upstream_retries=retries,
                               upstream_backoff_seconds=0.0,
                               upstream_read_timeout_seconds=0.3)
    return Upstreams(settings), Endpoint("shared", url, UPSTREAM_KEY)


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState(api_key=UPSTREAM_KEY)
    with serve(create_stub_app(state)) as url:
        yield url, state


Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on a free port; `handler` gets each connection with its number (0, 1..)."""
    accepted = 0

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        number, accepted = accepted, accepted + 1
        try:
            await handler(number, reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and content-length body; b"" when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


def ok(payload: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(payload), payload)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed or overloaded endpoint does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def events_of(stream: bytes) -> list[str]:
    return [line[7:] for line in stream.decode().split("\n") if line.startswith("event: ")]


async def test_a_json_answer_and_a_chunked_sse_stream_over_one_kept_alive_connection(
        stub: tuple[str, StubState]) -> None:
    url, state = stub
    pool = pool_for(url)
    response = await pool.post("/v1/messages", HEADERS, body("one two three"))
    assert response.status == 200 and "content-length" in response.headers
    message = json.loads(await response.read())
    assert message["content"][0]["text"] == "echo: one two three"
    assert message["usage"]["output_tokens"] == 4

    response = await pool.post("/v1/messages", HEADERS, body("one two three", stream=True))
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    pieces = [piece async for piece in response.chunks()]
    stream = b"".join(pieces)
    assert events_of(stream) == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop"]
    assert b'"text":" three"' in stream and stream.endswith(b'{"type":"message_stop"}\n\n')

    for _ in range(5):
        response = await pool.post("/v1/messages", HEADERS, body())
        assert response.status == 200
        await response.read()
    assert pool.opened == 1 and pool.open_connections == 1
    # The stub saw our headers and none of aiohttp's (no compression asked for).
    assert state.received[-1].headers["accept-encoding"] == "identity"
    assert state.received[-1].headers["x-api-key"] == UPSTREAM_KEY
    await pool.aclose()
    assert pool.open_connections == 0


async def test_concurrent_requests_share_at_most_the_cap_of_connections(
        stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.delay_seconds = 0.1
    pool = pool_for(url, max_connections=3)

    async def call(n: int) -> str:
        response = await pool.post("/v1/messages", HEADERS, body(f"call {n}"))
        return str(json.loads(await response.read())["content"][0]["text"])

    answers = await asyncio.gather(*(call(n) for n in range(9)))
    assert answers == [f"echo: call {n}" for n in range(9)]
    assert pool.opened == 3
    await asyncio.gather(*(call(n) for n in range(3)))
    assert pool.opened == 3 and pool.open_connections == 3
    await pool.aclose()


async def test_a_kept_alive_connection_the_endpoint_closed_is_replaced_at_once() -> None:
    """The endpoint answers one request per connection and drops the connection when the
    next request arrives on it (its idle close racing ours): the request goes out again on
    a fresh connection, within the pool, without the caller's retry."""
    async def one_per_connection(number: int, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b'{"connection": %d}' % number))
        await writer.drain()
        await read_request(reader)
        reset(writer)

    async with raw_server(one_per_connection) as url:
        pool = pool_for(url)
        first = await pool.post("/v1/messages", HEADERS, body())
        assert await first.read() == b'{"connection": 0}'
        second = await pool.post("/v1/messages", HEADERS, body())
        assert await second.read() == b'{"connection": 1}'
        assert pool.opened == 2
        await pool.aclose()


async def test_a_reset_before_the_first_byte_is_retried_then_reported_as_502() -> None:
    async def first_one_reset(number: int, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            if number == 0:
                reset(writer)
                return
            writer.write(ok(b'{"served": true}'))
            await writer.drain()

    async with raw_server(first_one_reset) as url:
        retrying, endpoint = upstreams(url, retries=1)
        answer = await retrying.send(endpoint, "/v1/messages", body(), HEADERS, read_body=True)
        assert answer.status == 200 and answer.content == b'{"served": true}'
        await retrying.aclose()

    async def always_reset(_: int, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reset(writer)

    async with raw_server(always_reset) as url:
        once, endpoint = upstreams(url, retries=0)
        with pytest.raises(ApiError) as caught:
            await once.send(endpoint, "/v1/messages", body(), HEADERS, read_body=True)
        assert caught.value.status == 502
        assert json.loads(caught.value.body())["error"]["type"] == "api_error"
        await once.aclose()


async def test_silence_past_the_read_timeout_before_the_head_and_inside_a_stream(
        stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.delay_seconds = 1.0
    pool = pool_for(url, read_timeout=0.2)
    with pytest.raises(TimeoutError):
        await pool.post("/v1/messages", HEADERS, body())
    assert pool.open_connections == 0  # a connection with an answer pending is not reused

    retrying, endpoint = upstreams(url, retries=1)  # read timeout 0.3 s
    with pytest.raises(ApiError) as caught:
        await retrying.send(endpoint, "/v1/messages", body(), HEADERS, read_body=True)
    assert caught.value.status == 504
    await retrying.aclose()

    state.delay_seconds, state.event_delay_seconds = 0.0, 0.5
    response = await pool.post("/v1/messages", HEADERS, body(stream=True))
    assert response.status == 200
    with pytest.raises(TimeoutError):
        async for _ in response.chunks():
            pass
    response.close()
    assert pool.open_connections == 0


async def test_an_upstream_error_reaches_the_caller_in_anthropics_shape(
        stub: tuple[str, StubState]) -> None:
    url, state = stub
    once, endpoint = upstreams(url, retries=0)
    for status, kind in ((500, "api_error"), (529, "overloaded_error"),
                         (429, "rate_limit_error")):
        state.fail_next = [status]
        with pytest.raises(ApiError) as caught:
            await once.send(endpoint, "/v1/messages", body(), HEADERS, read_body=True)
        assert caught.value.status == status
        error = json.loads(caught.value.body())
        assert error == {"type": "error", "error": {"type": kind,
                                                    "message": f"stub failure {status}"}}
    retrying, endpoint = upstreams(url, retries=1)
    state.fail_next = [503]
    answer = await retrying.send(endpoint, "/v1/messages", body("again"), HEADERS,
                                 read_body=True)
    assert json.loads(answer.content)["content"][0]["text"] == "echo: again"
    # Error answers were read to their end: their connections served the next request.
    assert once._pools[url].opened == 1 and retrying._pools[url].opened == 1
    await once.aclose()
    await retrying.aclose()


async def test_informational_answers_a_body_that_ends_with_the_connection_and_bad_headers() -> None:
    requests: list[bytes] = []

    async def until_eof(_: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"whole\":")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b" true}")
        await writer.drain()

    async def hints_first(_: int, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n")
            writer.write(ok(b'{"after": "hints"}'))
            await writer.drain()

    async with raw_server(hints_first) as url:
        pool = pool_for(url)
        for _ in range(2):
            response = await pool.post("/v1/messages", HEADERS, body())
            assert response.status == 200 and "link" not in response.headers
            assert await response.read() == b'{"after": "hints"}'
        assert pool.opened == 1
        await pool.aclose()

    async with raw_server(until_eof) as url:
        pool = pool_for(url)
        response = await pool.post("/v1/messages", HEADERS, body())
        assert await response.read() == b'{"whole": true}'
        assert pool.open_connections == 0  # not reusable: its end was the connection's end

        once, _ = upstreams(url, retries=2)
        broken = Endpoint("dedicated", url, "sk-from-a-secret\n")
        with pytest.raises(ApiError) as caught:
            await once.send(broken, "/v1/messages", body(), HEADERS, read_body=True)
        assert caught.value.status == 502
        assert len(requests) == 1  # refused before anything was sent, and not retried
        with pytest.raises(ValueError, match="x-api-key header has a line break"):
            pool.encode("/v1/messages", {"x-api-key": "a\r\nx-injected: 1"}, b"")
        await once.aclose()


async def test_a_cancelled_call_closes_its_connection_and_frees_its_place(
        stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.delay_seconds = 1.0
    pool = pool_for(url, max_connections=1)
    waiting = asyncio.create_task(pool.post("/v1/messages", HEADERS, body()))
    queued = asyncio.create_task(pool.post("/v1/messages", HEADERS, body()))
    await asyncio.sleep(0.2)
    waiting.cancel()
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert pool.open_connections == 0
    state.delay_seconds = 0.0
    response = await pool.post("/v1/messages", HEADERS, body("after"))
    assert json.loads(await response.read())["content"][0]["text"] == "echo: after"
    await pool.aclose()


async def test_nothing_listening_is_a_broken_connection_and_a_502() -> None:
    async with raw_server(lambda *_: asyncio.sleep(0)) as url:
        pass  # closed again: its port refuses connections now
    pool = pool_for(url)
    with pytest.raises(ConnectionBroken, match="cannot connect"):
        await pool.post("/v1/messages", HEADERS, body())
    assert pool.open_connections == 0
    once, endpoint = upstreams(url, retries=1)
    with pytest.raises(ApiError) as caught:
        await once.send(endpoint, "/v1/messages", body(), HEADERS, read_body=True)
    assert caught.value.status == 502
    assert json.loads(caught.value.body())["error"]["message"] == (
        "The model endpoint is unreachable.")


def test_the_request_bytes_carry_the_endpoints_base_path_and_host() -> None:
    pool = Pool("https://gateway.example:8443/anthropic/", max_connections=1,
                connect_timeout=1, read_timeout=1)
    data = pool.encode("/v1/messages", {"x-api-key": "k"}, b"{}")
    assert data == (b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: gateway.example:8443\r\n"
                    b"x-api-key: k\r\naccept-encoding: identity\r\ncontent-length: 2\r\n\r\n{}")
    assert Pool("https://api.anthropic.com", max_connections=1, connect_timeout=1,
                read_timeout=1).encode("/v1/x", {}, b"").startswith(
        b"POST /v1/x HTTP/1.1\r\nhost: api.anthropic.com\r\n")
    with pytest.raises(ValueError, match="unsupported endpoint URL"):
        Pool("ftp://x", max_connections=1, connect_timeout=1, read_timeout=1)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (openssl, as on every machine the tests run on)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_verifies_the_endpoints_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def answer(_: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ok(b'{"over": "tls"}'))
            await writer.drain()

    server = await asyncio.start_server(
        lambda r, w: answer(0, r, w), "127.0.0.1", 0, ssl=tls)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        untrusting = pool_for(url)  # the system's CAs: a self-signed certificate is refused
        with pytest.raises(ConnectionBroken, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.post("/v1/messages", HEADERS, body())
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = pool_for(url)
        for _ in range(3):
            response = await trusting.post("/v1/messages", HEADERS, body())
            assert await response.read() == b'{"over": "tls"}'
        assert trusting.opened == 1
        await trusting.aclose()
    finally:
        server.close()


async def test_a_large_body_read_whole_and_streamed_past_the_pause_threshold() -> None:
    large = b"x" * (3 * 2**20)

    async def answer(_: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ok(large))
            await writer.drain()

    async with raw_server(answer) as url:
        pool = pool_for(url, read_timeout=2.0)
        whole = await pool.post("/v1/messages", HEADERS, body())
        assert await whole.read() == large
        streamed = await pool.post("/v1/messages", HEADERS, body())
        received = bytearray()
        async for piece in streamed.chunks():
            received += piece
            await asyncio.sleep(0.01)  # a slow consumer: the socket's reading pauses
        assert bytes(received) == large
        assert pool.opened == 1
        await pool.aclose()
