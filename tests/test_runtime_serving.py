"""The hot path's serving: the raw ASGI routes answer as the FastAPI routes do, and the
coalescing transport sends what one loop turn wrote in one write, in order."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from runtime_helpers import MODEL, UPSTREAM_KEY, RuntimeServer, serve, wait_for
from starlette.types import Receive, Scope, Send
from tenantry_devenv.services import Redis
from tenantry_runtime.app import create_app
from tenantry_runtime.serving import CoalescingTransport
from tenantry_runtime.settings import RuntimeSettings

pytestmark = pytest.mark.timeout(120)


class RecordingTransport(asyncio.Transport):
    """Stands in for the socket's transport: what was written, in which calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed_after: int | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed_after = len(self.writes)

    def is_closing(self) -> bool:
        return self.closed_after is not None


async def test_writes_of_one_loop_turn_leave_together_in_order_and_close_sends_them_first(
        ) -> None:
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"{}")
    assert inner.writes == []
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    transport.write(b"data: 1\n\n")
    await asyncio.sleep(0)
    transport.write(b"data: 2\n\n")
    transport.close()
    assert inner.writes[1:] == [b"data: 1\n\n", b"data: 2\n\n"]
    assert inner.closed_after == 3
    assert transport.is_closing()  # the rest reaches the real transport


@pytest.fixture(scope="module")
def fastapi_only(runtime_server: RuntimeServer, redis_server: Redis,
                 upstream_stub: tuple[str, object]) -> Iterator[str]:
    """A second runtime over the same tenants, every request through FastAPI's own routes."""
    settings = RuntimeSettings(
        tenants_dir=runtime_server.tenants_dir, config_poll_seconds=0.1,
        redis_url=SecretStr(redis_server.url), upstream_url=upstream_stub[0],
        upstream_api_key=SecretStr(UPSTREAM_KEY), max_body_bytes=64 * 1024,
        max_concurrent_per_tenant=1000)
    app = create_app(settings)

    async def through_fastapi(scope: Scope, receive: Receive, send: Send) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    with serve(through_fastapi) as url:
        yield url


def tenant_on_both(runtime_server: RuntimeServer, fastapi_only: str, tenant: str) -> str:
    """A new tenant's key, once the second runtime has read its file too."""
    key = runtime_server.add_tenant(tenant)["main"]
    wait_for(lambda: httpx.get(f"{fastapi_only}/v1/models", headers={
        "x-api-key": key}).status_code == 200, 10, "the second runtime to read the tenant")
    return key


def _without_ids(text: str) -> str:
    text = re.sub(r'"msg_stub\d+"', "ID", text)
    return re.sub(r"req_[0-9a-f]{24}", "REQ", text)


@pytest.mark.parametrize("body", [
    {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "same?"}]},
    {"model": MODEL, "max_tokens": 16, "stream": True,
     "messages": [{"role": "user", "content": "same stream?"}]},
    {"model": MODEL, "max_tokens": 10**9, "messages": [{"role": "user", "content": "x"}]},
    {"model": MODEL, "max_tokens": 16, "messages": ["not an object"]},
    {"model": "another-model", "messages": [{"role": "user", "content": "x"}]},
], ids=["message", "stream", "over-max-tokens", "bad-messages", "count-other-model"])
def test_the_raw_routes_answer_exactly_as_the_fastapi_routes(
        runtime_server: RuntimeServer, fastapi_only: str, body: dict[str, Any]) -> None:
    key = tenant_on_both(runtime_server, fastapi_only, "servingsame")
    path = "/v1/messages/count_tokens" if "max_tokens" not in body else "/v1/messages"
    answers = []
    for base in (runtime_server.url, fastapi_only):
        response = httpx.post(f"{base}{path}", json=body, headers={
            "x-api-key": key, "anthropic-version": "2023-06-01"})
        headers = {name: value for name, value in response.headers.items()
                   if name not in ("date", "content-length", "transfer-encoding")}
        answers.append((response.status_code, _without_ids(str(headers)),
                        _without_ids(response.text)))
    assert answers[0] == answers[1]
    assert "request-id" in answers[0][1]


def test_bad_key_and_too_large_bodies_answer_alike_on_both_paths(
        runtime_server: RuntimeServer, fastapi_only: str) -> None:
    key = tenant_on_both(runtime_server, fastapi_only, "servingerrors")
    for headers, content in (({"x-api-key": "sk-tnt-nope"}, b"{}"),
                             ({"x-api-key": key}, b"x" * (64 * 1024 + 1)),
                             ({"x-api-key": key}, b"{not json")):
        answers = [httpx.post(f"{base}/v1/messages", content=content, headers=headers)
                   for base in (runtime_server.url, fastapi_only)]
        assert [a.status_code for a in answers] == [answers[0].status_code] * 2
        assert answers[0].json() == answers[1].json()
        assert answers[0].json()["type"] == "error"
