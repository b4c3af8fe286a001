"""A changed TenantPlan reaches its tenants now, paced, instead of on their next resync."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


def start_offsets(count: int, per_second: float) -> list[float]:
    """Pure: when (seconds from now) each of `count` tenants starts: at most `per_second`."""
    return [index / per_second for index in range(count)]


async def roll_out(plan: str, tenants: Iterable[str], reconcile: Callable[[str], Awaitable[None]],
                   per_second: float, concurrency: int) -> list[str]:
    """Reconcile each tenant, started at most `per_second` and `concurrency` at once; return
    the tenants whose reconcile raised (their resync timer repairs them later)."""
    names = sorted(set(tenants))
    gate = asyncio.Semaphore(concurrency)
    failed: list[str] = []

    async def one(name: str, offset: float) -> None:
        await asyncio.sleep(offset)
        async with gate:
            try:
                await reconcile(name)
            except Exception as err:
                log.warning("plan %s: reconciling tenant %s failed: %s", plan, name, err)
                failed.append(name)

    await asyncio.gather(*(one(name, offset) for name, offset
                           in zip(names, start_offsets(len(names), per_second), strict=True)))
    return failed
