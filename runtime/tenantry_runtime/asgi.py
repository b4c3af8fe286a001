"""The hot path's HTTP plumbing: POST /v1/messages and count_tokens served as raw ASGI.

FastAPI keeps the API surface (every route, /openapi.json, the fuzzing test's map of it), but
on the two routes every request pays for, its middleware stack, `Request` and `Response`
objects and dependency solving cost more CPU than the runtime's own work (py-spy,
bench/README.md). `RuntimeApp` answers those two paths itself with the same route functions
the FastAPI routes call (`HotRoute`), so both ways behave the same; everything else goes to
FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from .errors import ApiError

log = logging.getLogger(__name__)

JSON = "application/json"
# What Starlette's StreamingResponse sends for media_type="text/event-stream".
EVENT_STREAM = "text/event-stream; charset=utf-8"

Headers = Mapping[str, str]
# Reads the whole request body, or raises ApiError 413 past the given size.
BodyReader = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True)
class Reply:
    """A hot route's answer: a JSON body, or an SSE stream passed through as it comes."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None


# (request id, request headers, body reader) -> the reply; raises ApiError for the client.
HotRoute = Callable[[str, Headers, BodyReader], Awaitable[Reply]]


def error_reply(error: ApiError, request_id: str | None = None) -> Reply:
    headers = error.headers()
    if request_id:
        headers["request-id"] = request_id
    return Reply(error.status, headers, error.body())


async def collect_body(headers: Headers, stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, or 413 as soon as it is (or says it will be) over `limit`."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError("request_too_large", f"Request exceeds the maximum size of {limit} bytes.")


def headers_of(scope: Scope) -> dict[str, str]:
    """The request headers by lowercase name; the first of repeated ones wins (as Starlette's
    `Headers.get`)."""
    return {name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in reversed(scope["headers"])}


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def new_request_id() -> str:
    """`req_` and 24 random hex digits (as before, without building a UUID object)."""
    return "req_" + os.urandom(12).hex()


class RuntimeApp(FastAPI):
    """The FastAPI app, with `hot_routes` (POST path -> route) answered without it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.hot_routes: dict[str, HotRoute] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.hot_routes.get(scope["path"])
            if route is not None:
                await serve_hot(route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def serve_hot(route: HotRoute, scope: Scope, receive: Receive, send: Send) -> None:
    request_id = new_request_id()
    headers = headers_of(scope)

    def read(limit: int) -> Awaitable[bytes]:
        return collect_body(headers, body_chunks(receive), limit)

    try:
        reply = await route(request_id, headers, read)
    except ApiError as error:
        reply = error_reply(error, request_id)
    except ClientDisconnect:
        return  # gone before its body arrived: nobody to answer
    except Exception as error:
        log.exception("unexpected error on %s", scope["path"], exc_info=error)
        reply = error_reply(ApiError("api_error", "Internal error."), request_id)
    await send_reply(reply, receive, send)


async def send_reply(reply: Reply, receive: Receive, send: Send) -> None:
    raw = [(name.encode("latin-1"), value.encode("latin-1"))
           for name, value in reply.headers.items()]
    if reply.stream is None:
        raw += ((b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(reply.body)))
        await send({"type": "http.response.start", "status": reply.status, "headers": raw})
        await send({"type": "http.response.body", "body": reply.body})
        return
    raw.append((b"content-type", EVENT_STREAM.encode()))
    await stream_until_disconnect(
        reply.stream, receive, send,
        {"type": "http.response.start", "status": reply.status, "headers": raw})


async def stream_until_disconnect(stream: AsyncGenerator[bytes, None], receive: Receive,
                                  send: Send, start: Message) -> None:
    """Send the response's head (`start`) and the stream's chunks; a client that leaves
    cancels the stream (its generator then bills what the model still generates, see
    `relay_stream`), as Starlette's StreamingResponse does.

    The chunks are sent from this task, with one task listening for the client's leaving
    (it cancels this one), rather than from a pump task awaited with `asyncio.wait`: a task
    and its loop turns less per stream (bench/README.md, third round). The head goes with
    the first chunk (or the end), in the same write (`serving.CoalescingTransport`): when the
    whole answer comes in one read, its chunk waits for the settlement, and a head sent
    before it would be a write of its own (bench/README.md, fourth round)."""
    pumping = asyncio.current_task()
    assert pumping is not None  # ASGI apps run in a task
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        gone = True
        pumping.cancel()

    listening = asyncio.create_task(disconnected())
    head: Message | None = start
    try:
        async for chunk in stream:
            if head is not None:
                head = None
                await send(start)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        listening.cancel()  # before the last send: the response's end is no disconnect
        if head is not None:
            await send(start)
        await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if not gone:
            raise  # this task was cancelled, not the client gone
        pumping.uncancel()
    finally:
        listening.cancel()
        await stream.aclose()
