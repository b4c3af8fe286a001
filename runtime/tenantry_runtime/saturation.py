"""Admission under saturation: a cap on requests in flight per worker, higher plan tiers first.

Below the cap a request passes at once. At the cap it waits in a priority queue (highest
`plan_tier` first, then arrival order) for at most `wait_seconds`; a slot freed by a
finishing request goes straight to the best waiter. A request still waiting at the end gets
529 `overloaded_error` with `retry-after` (the SDK retries it). Per-tenant caps are checked
before, so one tenant's burst cannot fill the queue for everyone.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from .errors import ApiError


def overloaded() -> ApiError:
    return ApiError("overloaded_error", "The runtime is overloaded; try again shortly.",
                    retry_after=1)


@dataclass
class SaturationGate:
    capacity: int  # 0: no cap
    wait_seconds: float
    in_use: int = 0
    _waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    # Waiters still waiting (cancelled ones stay in the heap until popped).
    waiting: int = 0

    async def acquire(self, tier: int) -> None:
        """A slot, or ApiError 529 after `wait_seconds` at the cap."""
        if self.capacity == 0 or (self.in_use < self.capacity and not self.waiting):
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-tier, next(self._order), future))
        self.waiting += 1
        try:
            await asyncio.wait({future}, timeout=self.wait_seconds)
        except asyncio.CancelledError:
            # The client left while waiting: give back a slot handed over meanwhile.
            if future.done():
                self.release()
            else:
                self._give_up(future)
            raise
        if future.done():
            return  # handed a slot by release() (in_use already counts it)
        self._give_up(future)
        raise overloaded()

    def _give_up(self, future: asyncio.Future[None]) -> None:
        future.cancel()
        self.waiting -= 1

    def release(self) -> None:
        """Hand the slot to the best waiter, else free it."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                self.waiting -= 1
                return
        self.in_use = max(0, self.in_use - 1)
