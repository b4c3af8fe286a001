"""Run a coroutine to its end in the current task, whatever cancels the task meanwhile.

A stream's settlement must not be cut in half by a client that leaves during it (the cancel
of the request's task). `asyncio.shield` gives that by running the settlement in a task of its
own: a Task, and three more loop turns, per streamed request (bench/README.md, fourth round).
`uncancellable` runs the coroutine in the caller's task instead and delivers a cancel only
when the coroutine is done (then it raises CancelledError, as `await shield(...)` would have,
so whoever cancelled sees the cancel).

A cancel reaches a task through the future it waits on: `Task.cancel()` cancels that future.
So the futures the coroutine waits on must not be cancelled: those made by `reply_future`
(the Redis client's replies) refuse it while an `uncancellable` coroutine runs, so the task
waits on them as usual (no extra loop turn); any other future (a lock, a thread, a
connection) is waited on through a proxy future, which is what gets cancelled.

The coroutine must not cancel its own task (`asyncio.timeout` does): that cancel would be
held back like any other. The Redis client's connect uses `asyncio.wait_for` for that reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

# How many `uncancellable` coroutines are running a step right now (0 or 1: a step runs
# synchronously, and steps of other tasks do not interleave with it).
_stepping = 0


class _RefusingFuture(asyncio.Future[Any]):
    """A future that cannot be cancelled: the task waiting on it gets the cancel once it is
    done (`Task.cancel()` then marks the task to be cancelled at its next step)."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def reply_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """A new future for a reply: one that refuses cancelling when made by an `uncancellable`
    coroutine, else a plain one."""
    return _RefusingFuture(loop=loop) if _stepping else loop.create_future()


class uncancellable:  # lowercase: used like a function, `await uncancellable(coro)`
    """`await uncancellable(coro)`: coro's result, after coro ran to its end; a cancel of the
    task meanwhile is raised (as CancelledError) only then."""

    __slots__ = ("_coro",)

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, None, Any]:
        global _stepping
        coro = self._coro
        cancel: asyncio.CancelledError | None = None
        try:
            while True:
                _stepping += 1
                try:
                    waited = coro.send(None)
                except StopIteration as done:
                    result = done.value
                    break
                except BaseException as error:
                    if cancel is not None:
                        raise cancel from error
                    raise
                finally:
                    _stepping -= 1
                if waited is None or isinstance(waited, _RefusingFuture):
                    # A bare yield, or a future the cancel cannot reach: wait as usual.
                    try:
                        yield waited
                    except asyncio.CancelledError as error:
                        cancel = error
                    continue
                waited._asyncio_future_blocking = False
                while not waited.done():
                    proxy = asyncio.get_running_loop().create_future()
                    waited.add_done_callback(lambda _, proxy=proxy: proxy.done()
                                             or proxy.set_result(None))
                    try:
                        yield from proxy.__await__()
                    except asyncio.CancelledError as error:
                        cancel = error
        finally:
            coro.close()  # nothing left to run unless the caller itself was closed
        if cancel is not None:
            raise cancel
        return result
