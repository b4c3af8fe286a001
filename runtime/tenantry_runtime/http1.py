"""A minimal pooled HTTP/1.1 client for the upstream call: kept-alive connections per endpoint.

aiohttp cost ~15% of the runtime's CPU per non-streaming request under load (py-spy,
bench/README.md): a writer task, request/response objects, header multidicts, a payload
object and a stream reader per request. The runtime needs far less: POST a body it already
holds, read a status, a few headers and a body that is either whole (content-length, chunked,
or up to EOF) or streamed as it arrives. This client does that on an asyncio Protocol with
httptools' parser (uvicorn's, already installed): one write per request (head and body
together), body pieces handed over without copies, and one silence timer per request.

What it keeps of a real client: TLS (https URLs, the system's CA store), a connect timeout
(TCP and TLS handshake), a read timeout as the longest silence between two bytes (aiohttp's
`sock_read`), a cap on connections per endpoint with waiters, idle expiry, flow control on
streamed bodies, and one immediate retry on a fresh connection when a kept-alive connection
turns out closed before any byte of the answer came back (the endpoint closed it while idle:
the request never reached it). Any other failure is the caller's to retry (`upstream.py`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

# Streamed bodies: stop reading from the socket while this much is waiting for the consumer.
PAUSE_ABOVE_BYTES = 256 * 1024
# Idle kept-alive connections older than this are closed rather than reused (aiohttp's 15 s).
IDLE_SECONDS = 15.0


class ConnectionBroken(Exception):
    """No connection, a connection that broke, or an answer that is not HTTP."""


class _Connection(asyncio.Protocol):
    """One connection, one request at a time; its answer's head and body as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._begin(expecting=False)

    def _begin(self, *, expecting: bool) -> None:
        self.expecting = expecting  # a request is out and its answer not complete
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: BaseException | None = None
        self._last_data = 0.0
        self._paused = False
        self._streaming = False  # read piece by piece (`pieces`): reading may pause

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.expecting:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.close()
            return
        self.got_bytes = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ConnectionBroken(f"the endpoint's answer is not valid HTTP: {error}"))
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.expecting and not self.complete and self.error is None:
            if self.head_done and exc is None and self._ends_at_eof():
                self._finish(keep_alive=False)  # a body delimited by the connection's end
            else:
                self._fail(ConnectionBroken(
                    "the endpoint closed the connection before the answer ended"
                    + (f": {exc}" if exc else "")))
        self._wake()

    # --- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = self.status >= 200  # a 1xx (103 Early Hints) comes before the answer

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if (self._streaming and self.buffered > PAUSE_ABOVE_BYTES and not self._paused
                and self.transport is not None):
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of a 1xx: the answer follows on this connection
            self.headers = {}
            return
        self._finish(keep_alive=self._parser.should_keep_alive())

    # --- the request ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self._begin(expecting=True)
        if self.closed or self.transport is None or self.transport.is_closing():
            self._fail(ConnectionBroken("the connection is closed"))
            return
        self.transport.write(data)
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._check_silence)

    async def head(self) -> None:
        while not self.head_done and self.error is None:
            await self._wait()
        if self.error is not None:
            raise self.error

    async def read_all(self) -> bytes:
        while not self.complete and self.error is None:
            await self._wait()
        if self.error is not None:
            raise self.error
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        return body

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what came in since the last piece, joined."""
        self._streaming = True
        while True:
            if self.body:
                data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
                self.body = []
                self.buffered = 0
                if self._paused and self.transport is not None and not self.complete:
                    self._paused = False
                    self._last_data = self._loop.time()
                    self.transport.resume_reading()
                yield data
            elif self.error is not None:
                raise self.error
            elif self.complete:
                return
            else:
                await self._wait()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    # --- internals ------------------------------------------------------------------------

    def _ends_at_eof(self) -> bool:
        return ("content-length" not in self.headers
                and "chunked" not in self.headers.get("transfer-encoding", "").lower())

    def _finish(self, *, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        self.expecting = False
        self._stop_timer()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.expecting = False
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        self._wake()

    def _check_silence(self) -> None:
        self._timer = None
        if not self.expecting:
            return
        now = self._loop.time()
        if self._paused:  # the consumer is behind, not the endpoint
            self._last_data = now
        due = self._last_data + self._read_timeout
        if now >= due:
            self._fail(TimeoutError(f"no data from the endpoint for {self._read_timeout:g}s"))
        else:
            self._timer = self._loop.call_at(due, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Response:
    """An answer's status and headers; its body read whole or as it arrives. `close()` hands
    the connection back for reuse when the answer was read to its end, else closes it."""

    def __init__(self, pool: Pool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = connection.headers

    async def read(self) -> bytes:
        connection = self._connected()
        try:
            return await connection.read_all()
        finally:
            self.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connected()
        async for piece in connection.pieces():
            yield piece
        self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)

    def _connected(self) -> _Connection:
        if self._connection is None:
            raise ConnectionBroken("the answer was already read or closed")
        return self._connection


class Pool:
    """Kept-alive connections to one endpoint, at most `max_connections` at a time."""

    def __init__(self, url: str, *, max_connections: int, connect_timeout: float,
                 read_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported endpoint URL {url!r}")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = parts.port is None or parts.port == (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2] if not default_port else self._host
        self._base_path = parts.path.rstrip("/")
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[_Connection] = []
        self._open = 0  # connections counted against the cap (idle, busy or connecting)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.opened = 0  # connections made so far (tests: keep-alive reuse)

    @property
    def open_connections(self) -> int:
        """Connections counted against the cap: idle, busy or being made."""
        return self._open

    def encode(self, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
        """Pure: the request's bytes. A header with a line break (a Secret's trailing newline)
        is refused rather than sent as two headers."""
        lines = [f"POST {self._base_path}{path} HTTP/1.1\r\nhost: {self._host_header}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                raise ValueError(f"the {name} header has a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"accept-encoding: identity\r\ncontent-length: {len(body)}\r\n\r\n")
        return "".join(lines).encode("latin-1") + body

    async def post(self, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Send the request and wait for the answer's head. Raises ConnectionBroken,
        TimeoutError (connect, or silence past the read timeout) or ValueError (headers)."""
        data = self.encode(path, headers, body)
        while True:
            connection, reused = await self._acquire()
            connection.send(data)
            try:
                await connection.head()
            except ConnectionBroken:
                self.release(connection)
                if reused and not connection.got_bytes:
                    continue  # closed by the endpoint while idle: nothing reached it
                raise
            except BaseException:
                self.release(connection)
                raise
            return Response(self, connection)

    def release(self, connection: _Connection) -> None:
        """Back to the idle list if it can serve another request, else closed."""
        if connection.reusable():
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            connection.close()
            self._open -= 1
        self._wake_one()

    async def aclose(self) -> None:
        for connection in self._idle:
            connection.close()
        self._open -= len(self._idle)
        self._idle.clear()

    async def _acquire(self) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        while True:
            while self._idle:
                connection = self._idle.pop()  # the most recently used: least likely stale
                if not connection.closed and loop.time() - connection.idle_since < IDLE_SECONDS:
                    return connection, True
                connection.close()
                self._open -= 1
            if self._open < self._max:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                elif waiter in self._waiters:  # not yet passed over by `_wake_one`
                    self._waiters.remove(waiter)
                raise
        self._open += 1
        try:
            return await self._connect(loop), False
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._read_timeout), self._host, self._port,
                    ssl=self._tls, server_hostname=self._host if self._tls else None)
        except OSError as error:  # refused, unreachable, reset, TLS (ssl.SSLError)
            raise ConnectionBroken(f"cannot connect to {self._host}:{self._port}: {error}"
                                   ) from error
        self.opened += 1
        return connection

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
