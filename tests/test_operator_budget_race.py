"""The BudgetAlert race: a reconcile never writes back a BudgetAlert older than the alert loop's.

The reconcile's status patch carries the whole conditions list (a JSON merge patch replaces a
list), BudgetAlert included. The interleavings are driven step by step in one event loop (the
alert loop and the reconciles share the leader's), against the real control plane, Postgres
and Redis, with the operator fixture running as well. The claims are given to the alert loop's
`update_condition` directly: the running operator reads none for these tenants, so it keeps
them WithinBudgets and never writes the condition these steps look at.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from kube_helpers import apply_tenant, delete_tenant, wait_ready
from pydantic import SecretStr
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Redis
from tenantry_operator.alerts import CONDITION, AlertDispatcher
from tenantry_operator.kube import Kube, Tenant, as_dict
from tenantry_operator.pipeline import reconcile_steps
from tenantry_operator.reconcile import Settled, reconcile_tenant, tenant_lock
from tenantry_operator.settings import OperatorSettings, get_settings

pytestmark = pytest.mark.usefixtures("operator")

DAILY_80 = [("daily", 80)]


@asynccontextmanager
async def parts(redis_url: str) -> AsyncIterator[tuple[Kube, AlertDispatcher]]:
    kube = Kube.from_env()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as http:
            yield kube, AlertDispatcher(kube, client, OperatorSettings(
                redis_url=SecretStr(redis_url)), http)
    finally:
        await client.aclose()
        await kube.close()


def budget_alert(settled: Settled) -> tuple[str, str]:
    """BudgetAlert's (status, reason) in the reconcile's status patch (which must have one)."""
    found = next(c for c in settled.status_patch["conditions"] if c["type"] == CONDITION)
    return found["status"], found["reason"]


def stored_budget_alert(tenant: Tenant | None) -> tuple[str, str]:
    assert tenant is not None
    found = next(c for c in as_dict(tenant)["status"]["conditions"] if c["type"] == CONDITION)
    return found["status"], found["reason"]


def aged(live: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A copy of the Tenant whose PlanResolved and Ready conditions were `change`d: a body the
    reconcile's patch (against it) rewrites the conditions of."""
    stale = copy.deepcopy(live)
    for cond in stale["status"]["conditions"]:
        if cond["type"] in ("PlanResolved", "Ready"):
            change(cond)
    return stale


async def written(alerts: AlertDispatcher, body: dict[str, Any],
                  claims: list[tuple[str, int]]) -> bool:
    """The alert loop's round writes the condition; a 409 (the running operator wrote the
    Tenant between its GET and PATCH) is retried the next round, as the loop does."""
    for _ in range(3):
        if await alerts.update_condition(body, claims):
            return True
    return False


def ready_tenant(plane: ControlPlane, name: str) -> None:
    apply_tenant(plane, name, deletionPolicy="Delete")
    wait_ready(plane, name)


def run(steps: Coroutine[Any, Any, None], plane: ControlPlane, name: str) -> None:
    try:
        asyncio.run(steps)
    finally:
        delete_tenant(plane, name)


def test_a_reconcile_from_a_body_older_than_the_alert_loops_write_carries_that_write(
        control_plane: ControlPlane, redis_server: Redis) -> None:
    name = "racestale"
    ready_tenant(control_plane, name)

    async def steps() -> None:
        async with parts(redis_server.url) as (kube, alerts):
            live = as_dict(await kube.get(Tenant, name))
            # The reconcile's body is taken, then the alert loop writes the condition...
            stale = aged(live, lambda c: c.update(status="False", reason="PlanNotFound",
                                                  lastTransitionTime="2020-01-01T00:00:00Z"))
            await alerts.update_condition(live, DAILY_80)  # (a 409 would leave it recorded)
            # ...then the reconcile, whose patch changes other conditions, runs on that body.
            settled = await reconcile_tenant(stale, kube, get_settings(), reconcile_steps())
            assert budget_alert(settled) == ("True", "Daily80Percent")

    run(steps(), control_plane, name)


def test_the_alert_loop_waits_for_a_reconcile_computing_or_in_flight(
        control_plane: ControlPlane, redis_server: Redis) -> None:
    name = "raceflight"
    ready_tenant(control_plane, name)

    async def steps() -> None:
        async with parts(redis_server.url) as (kube, alerts):
            live = as_dict(await kube.get(Tenant, name))
            # Only messages differ: the patch rewrites the conditions with what they are.
            stale = aged(live, lambda c: c.update(message="from an older body"))
            # A reconcile computes its patch (BudgetAlert as its body has it); kopf sends it
            # after the handler returns, so the alert loop's round comes first: it records the
            # new condition and does not write it yet...
            first = await reconcile_tenant(stale, kube, get_settings(), reconcile_steps())
            assert budget_alert(first) == ("False", "WithinBudgets")
            assert not await alerts.update_condition(live, DAILY_80)
            assert stored_budget_alert(await kube.get(Tenant, name)) == ("False", "WithinBudgets")
            # ...the patch lands, then the next round writes it.
            await kube.patch_tenant_status(name, first.status_patch)
            assert await written(alerts, live, DAILY_80)
            # Any later reconcile carries it, from whatever body.
            second = await reconcile_tenant(stale, kube, get_settings(), reconcile_steps())
            assert budget_alert(second) == ("True", "Daily80Percent")

            # While a reconcile holds the tenant's lock (computing from what it read before),
            # the alert loop does not write either; after it, it does.
            monthly = [("monthly", 100)]
            async with tenant_lock(name):
                assert not await alerts.update_condition(live, monthly)
            assert await written(alerts, live, monthly)
            third = await reconcile_tenant(stale, kube, get_settings(), reconcile_steps())
            assert budget_alert(third) == ("True", "Monthly100Percent")

    run(steps(), control_plane, name)
