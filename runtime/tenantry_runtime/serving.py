"""uvicorn's HTTP protocol with one send per response: its writes of one loop turn coalesced.

uvicorn writes a response's head and its body with two `transport.write` calls, and uvloop
sends each at once: two syscalls, and on loopback two wake-ups of the client. A JSON answer
is written within one turn of the event loop, so holding the writes until the end of the turn
sends head and body together (bench/README.md: the runtime's CPU per request). Order is kept;
close() sends what is held first. Streams still go out chunk by chunk as they arrive.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes wait for the end of the current loop turn, then go together."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# The most bytes a request's line and headers may take. uvicorn's httptools protocol has no
# limit (its h11 protocol has 16 KiB), and httptools keeps a header's value until it ends:
# one unauthenticated connection sending one endless header grew the worker by 400 MB.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 26\r\nconnection: close\r\n\r\nRequest headers too slow.\n")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                  b"charset=utf-8\r\ncontent-length: 27\r\nconnection: close\r\n\r\n"
                  b"Request headers too large.\n")


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport`, with a request's head
    limited to `MAX_HEAD_BYTES` (431) and to `head_timeout_seconds` (408) from the
    connection's start, the head's first byte or the last answer's end (an unread body
    must end within it too); the connection is closed after either.

    uvicorn has no such timeout: a connection that sends nothing, a head a byte at a time,
    or a body a byte at a time after its 401, stayed open for good, so a few thousand of
    them (slowloris) could take every file descriptor of the worker, and with them its
    connections to Redis, Postgres and the model endpoints."""

    head_timeout_seconds = 30.0
    _head_open = True  # a request's line or headers are (or will be) arriving
    _heads_done = 0
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(cast(asyncio.Transport, coalescing))
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_open and self._head_timer is None:
            self._start_head_timer()  # the first bytes of the connection's next request
        open_before, done_before = self._head_open, self._heads_done
        super().data_received(data)
        # Counted only when all of `data` is head: open before and after, none completed in
        # between (a read that also held a body or a request's end is not counted; the
        # limit may then be passed by at most one read).
        if not (open_before and self._head_open and done_before == self._heads_done):
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self.transport.write(HEAD_TOO_LARGE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_open, self._head_bytes = False, 0
        self._heads_done += 1
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered (a 401 too, its body unread): the rest of that body and the next head
        # get the same time. uvicorn's keep-alive timer would not do: any byte cancels it.
        if self._head_timer is None and not self.transport.is_closing() and (
                self.cycle is None or self.cycle.response_complete):
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_seconds, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and (self.cycle is None
                                                or self.cycle.response_complete):
            self.transport.write(HEAD_TIMEOUT)
            self.transport.close()

