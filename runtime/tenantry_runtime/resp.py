"""A minimal pipelined Redis client for the hot path: scripts over one connection.

redis-py's asyncio client spends ~70 us of CPU per command here (a task, two timeouts and a
pool checkout each); admission and settlement are the only Redis calls per request, so they
go through this client instead: commands are written in order on one connection and replies,
which Redis sends in the same order, resolve a FIFO of futures. Anything else (tests, tools)
keeps using redis-py.

Two things keep a command cheap (bench/README.md measured them): the commands issued during
one turn of the event loop leave in ONE write (each write on loopback wakes redis-server, the
costliest step of a command), and the reply deadline is one timer per connection instead of
an `asyncio.timeout` per command. Replies are parsed where they arrive (an asyncio Protocol),
and a script's EVALSHA head (its sha and keys) is encoded once per tenant and day.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from .uncancellable import reply_future


class RedisUnavailable(Exception):
    """No connection, a broken one, or no reply in time."""


class ReplyError(Exception):
    """Redis answered with an error reply."""


@dataclass(frozen=True)
class Script:
    source: str

    @cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class ScriptCall:
    """One script run: what `PipelinedRedis.run_scripts` sends."""

    script: Script
    keys: Sequence[str]
    args: Sequence[str | int | bytes]


def encode_command(args: Sequence[str | int | bytes]) -> bytes:
    """Pure: a command in RESP (an array of bulk strings). Three commands per request: the
    exact type tests and no formatting of the data halve its cost (py-spy, bench/README.md)."""
    return b"*%d\r\n" % len(args) + _bulk_strings(args)


def _bulk_strings(args: Sequence[str | int | bytes]) -> bytes:
    out: list[bytes] = []
    for arg in args:
        if type(arg) is str:
            data = arg.encode()
        elif type(arg) is bytes:
            data = arg
        else:
            data = str(arg).encode()
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def encode_script_call(sha: str, keys: Sequence[str], args: Sequence[str | int | bytes]
                       ) -> bytes:
    """Pure: EVALSHA of `sha` over `keys` with `args`, as `encode_command` encodes it. The
    part up to the last key is the same for a tenant's script all day (its keys change with
    the day, settle.lua's last key every 2 s), so it is encoded once (bench/README.md, third
    round: a third of the encoding's cost)."""
    return _script_head(sha, tuple(keys), len(args)) + _bulk_strings(args)


@lru_cache(maxsize=8192)
def _script_head(sha: str, keys: tuple[str, ...], arg_count: int) -> bytes:
    return b"*%d\r\n" % (3 + len(keys) + arg_count) + _bulk_strings(
        ("EVALSHA", sha, len(keys), *keys))


def parse_reply(data: bytes, at: int) -> tuple[Any, int]:
    """Pure: the RESP2 reply that begins at `at` and where the next one begins, or
    (None, -1) while `data` does not hold all of it. An error reply is returned as a
    ReplyError, not raised. Parsed where the bytes arrive (`_Connection.data_received`):
    no reader task to wake and no await per line (bench/README.md, third round)."""
    end = data.find(b"\r\n", at)
    if end < 0:
        return None, -1
    kind = data[at]
    if kind == 58:  # ":" integer
        return int(data[at + 1:end]), end + 2
    if kind == 36:  # "$" bulk string
        size = int(data[at + 1:end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(data) < stop + 2:
            return None, -1
        return data[end + 2:stop], stop + 2
    if kind == 42:  # "*" array
        count = int(data[at + 1:end])
        if count < 0:
            return None, end + 2
        items = []
        position = end + 2
        for _ in range(count):
            item, position = parse_reply(data, position)
            if position < 0:
                return None, -1
            items.append(item)
        return items, position
    if kind == 43:  # "+" simple string
        return data[at + 1:end], end + 2
    if kind == 45:  # "-" error
        return ReplyError(data[at + 1:end].decode(errors="replace")), end + 2
    raise RedisUnavailable(f"unexpected reply {data[at:at + 40]!r}")


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Address:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        path = parts.path.strip("/")
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, int(path or 0),
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None,
                   parts.scheme == "rediss")


class _Connection(asyncio.Protocol):
    """One connection: writes in order; replies, parsed as they arrive, resolve the FIFO of
    futures."""

    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.broken = False
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        # When each pending reply is due, oldest first (the same order as `pending`).
        self._due: deque[float] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        # Commands of this loop turn, written together by `_flush`.
        self._outgoing: list[bytes] = []
        self._buffer = b""  # the start of a reply whose rest has not arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        at = 0
        try:
            while at < len(buffer):
                reply, end = parse_reply(buffer, at)
                if end < 0:
                    break
                at = end
                future = self.pending.popleft()
                self._due.popleft()
                if not future.done():
                    future.set_result(reply)
        except (RedisUnavailable, ValueError, IndexError) as error:
            self.close(RedisUnavailable(f"Redis connection lost: {error!r}"))
            return
        self._buffer = buffer[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisUnavailable(f"Redis connection lost: {exc!r}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """`command` (encoded) goes out with the others of this loop turn; its reply."""
        future = reply_future(self._loop)
        if self.broken:
            future.set_exception(RedisUnavailable("Redis connection lost"))
            return future
        self.pending.append(future)
        self._due.append(self._loop.time() + self._timeout)
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._due[0], self._check_due)
        return future

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if not self.broken and self.transport is not None:
            self.transport.write(b"".join(outgoing))

    def _check_due(self) -> None:
        """No reply in time: drop the connection (its callers fail fast; later calls
        reconnect)."""
        self._watchdog = None
        if not self._due or self.broken:
            return
        if self._due[0] <= self._loop.time():
            self.close(RedisUnavailable("Redis did not answer in time"))
            return
        self._watchdog = self._loop.call_at(self._due[0], self._check_due)

    def close(self, error: Exception) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._due.clear()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedRedis:
    """Commands from many coroutines share one connection; reconnects after a failure."""

    def __init__(self, url: str, timeout: float) -> None:
        self._address = Address.from_url(url)
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def _connect(self) -> _Connection:
        async with self._connecting:
            if self._connection is not None and not self._connection.broken:
                return self._connection
            opened: list[_Connection] = []
            try:
                # wait_for, not asyncio.timeout: a settlement may connect, and an
                # `uncancellable` coroutine must not cancel its own task.
                connection = await asyncio.wait_for(self._open(opened), self._timeout)
            except (OSError, TimeoutError, RedisUnavailable) as error:
                for failed in opened:
                    failed.close(RedisUnavailable("connection setup failed"))
                if isinstance(error, RedisUnavailable):
                    raise
                raise RedisUnavailable(f"connecting to Redis failed: {error!r}") from None
            self._connection = connection
            return connection

    async def _open(self, opened: list[_Connection]) -> _Connection:
        """A new connection, authenticated and on its database (put in `opened` as soon as
        it exists, so a failure or timeout after that closes it)."""
        a = self._address
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(self._timeout), a.host, a.port,
            ssl=ssl.create_default_context() if a.tls else None)
        opened.append(connection)
        setup: list[list[str | int | bytes]] = []
        if a.password is not None:
            setup.append(["AUTH", a.password] if a.username is None
                         else ["AUTH", a.username, a.password])
        if a.db:
            setup.append(["SELECT", a.db])
        for command in setup:
            reply = await connection.send(encode_command(command))
            if isinstance(reply, ReplyError):
                raise RedisUnavailable(f"{command[0]!r} failed: {reply}")
        return connection

    async def execute(self, *args: str | int | bytes) -> Any:
        """Send one command; its reply (an error reply is raised as ReplyError)."""
        return await self._execute(encode_command(args))

    async def _execute(self, command: bytes) -> Any:
        connection = await self._connected()
        reply = await connection.send(command)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def _connected(self) -> _Connection:
        connection = self._connection
        if connection is None or connection.broken:
            connection = await self._connect()
        return connection

    async def run_script(self, script: Script, keys: Sequence[str],
                         args: Sequence[str | int | bytes]) -> Any:
        """EVALSHA, loading the script once when Redis does not know it (NOSCRIPT)."""
        command = encode_script_call(script.sha, keys, args)
        try:
            return await self._execute(command)
        except ReplyError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self._execute(command)

    async def run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Several scripts sent back to back in ONE write (Redis runs them in this order, so
        each sees what the ones before it wrote); their replies, an error reply returned as
        a ReplyError (one call's error is not the others'). A script Redis does not know is
        loaded and that call re-run after the others (only after a Redis restart or flush)."""
        connection = await self._connected()
        sent = [connection.send(encode_script_call(call.script.sha, call.keys, call.args))
                for call in calls]
        replies = [await reply for reply in sent]
        for n, reply in enumerate(replies):
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                try:
                    replies[n] = await self.run_script(calls[n].script, calls[n].keys,
                                                       calls[n].args)
                except ReplyError as error:
                    replies[n] = error
        return replies

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close(RedisUnavailable("client closed"))
            self._connection = None
