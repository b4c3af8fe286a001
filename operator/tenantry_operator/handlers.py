"""Thin kopf glue: run the reconciler on every change and on a timer, finalize on delete."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import kopf

from . import alerts, cache_scope, database, maintenance, plans, quotas
from . import finalize as finalizer
from .conditions import Condition, merge_conditions
from .kube import Kube, Tenant, as_dict
from .metrics import METRICS
from .model import GROUP, VERSION
from .names import ANNOTATION_FORCE_FINALIZE
from .pipeline import reconcile_steps
from .reconcile import Settled, forget_tenant, reconcile_slot, reconcile_tenant, tenant_lock
from .settings import get_settings

FINALIZER = f"{GROUP}/cleanup"
log = logging.getLogger(__name__)


# Startup migrates the shared database; while Postgres is down it is retried every 5 s (kopf's
# default of 60 s left a restarted operator idle for a minute after Postgres came back).
@kopf.on.startup(backoff=5)
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = get_settings()
    # Bounded concurrency: kopf's default worker limit is unbounded. Plan roll-outs and
    # deletions also take one of reconcile.reconcile_slot's worker_limit slots.
    settings.queueing.worker_limit = ours.worker_limit
    # A worker holds its slot while idle: kopf's default of 5 s after each object's last event
    # capped a burst of new tenants at about worker_limit / 5 s (1,000 tenants: 173 s).
    settings.queueing.idle_timeout = 0.2
    # kopf peering pauses every peer of equal priority, so it is never used: one replica at a
    # time runs kopf, chosen by the Lease in leader.py (`python -m tenantry_operator`).
    settings.peering.standalone = True
    settings.persistence.finalizer = FINALIZER
    # Keep kopf's bookkeeping out of .status: the status schema is ours and strict.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    memo["kube"] = kube = Kube.from_env()
    kube.use_fast_path()  # aiohttp for the per-tenant GETs and applies (fastpath.py)
    # Reads from watches (cache.py); until they are listed, reads go to the API server.
    keep = cache_scope.tenant_namespace_scope(
        ours.namespace_prefix, (ours.runtime_namespace, ours.credentials_namespace))
    if not await kube.start_caches(wait_seconds=30, keep=keep):
        log.warning("caches not listed within 30 s: reading from the API server meanwhile")
    await maintenance.on_startup(ours)
    memo["maintenance"] = asyncio.create_task(maintenance.keep_partitions_ahead(ours))
    memo["alerts"] = asyncio.create_task(alerts.deliver_alerts(memo["kube"], ours))


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    for name in ("maintenance", "alerts"):
        task = memo.get(name)
        if task is not None:
            task.cancel()
    kube = memo.get("kube")
    if kube is not None:
        await kube.close()
    await quotas.close_clients()
    await asyncio.to_thread(database.close_pools)


def post_events(body: kopf.Body, settled: Settled) -> None:
    for event in settled.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    name = body["metadata"]["name"]
    with METRICS.reconciling(name, body) as recorded:
        settled = await reconcile_tenant(body, memo["kube"], get_settings(), reconcile_steps())
        recorded(settled.outcome)
    # Only what changed: kopf sends no request for an empty patch.
    patch.status.update(settled.status_patch)
    post_events(body, settled)
    outcome = settled.outcome
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.status["phase"], delay=outcome.retry_after)


@kopf.on.resume(GROUP, VERSION, "tenants")
@kopf.on.create(GROUP, VERSION, "tenants")
@kopf.on.update(GROUP, VERSION, "tenants", field="spec")
async def tenant_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(body, patch, memo)


@kopf.timer(GROUP, VERSION, "tenants", interval=get_settings().reconcile_interval_seconds,
            initial_delay=get_settings().reconcile_interval_seconds)
async def tenant_resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Level-based repair: re-apply everything, so hand-deleted objects come back."""
    # The next tick retries; a timer that raises would back off for a minute instead.
    with contextlib.suppress(kopf.TemporaryError):
        await _reconcile(body, patch, memo)


async def plan_users(kube: Kube, plan: str) -> AsyncIterator[dict[str, Any]]:
    async for obj in kube.client.list(Tenant):
        body = as_dict(obj)
        if (body.get("spec") or {}).get("planRef", {}).get("name") == plan:
            yield body


def waits_for_plan(body: dict[str, Any]) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "PlanResolved" and c.get("reason") == "PlanNotFound"
               for c in conditions)


# The last spec seen of each plan: a watch event whose spec is unchanged (status, labels, a
# relist) rolls nothing out. In memory on purpose: kopf's change handlers would store their
# diff base on each TenantPlan, a write the platform team's objects should not get.
_plan_specs: dict[str, Any] = {}


@kopf.on.event(GROUP, VERSION, "tenantplans")
async def plan_changed(name: str, type: str | None, spec: kopf.Spec, memo: kopf.Memo,
                       **_: Any) -> None:
    """Re-reconcile the plan's tenants now: limits and runtime config follow within seconds.

    A plan first seen (created, or listed when this operator starts) concerns only the
    tenants that found it missing; the others have their own handlers.
    """
    if type == "DELETED":
        _plan_specs.pop(name, None)
        return
    current, previous = dict(spec), _plan_specs.get(name)
    _plan_specs[name] = current
    if previous == current:
        return
    first_seen = previous is None
    kube: Kube = memo["kube"]
    ours = get_settings()

    async def reconcile_one(tenant: str) -> None:
        live = await kube.get(Tenant, tenant)
        if live is None:
            return
        body = kopf.Body(cast(kopf.RawBody, as_dict(live)))
        if (body.metadata.get("deletionTimestamp")
                or (body.spec.get("planRef") or {}).get("name") != name):
            return
        settled = await reconcile_tenant(body, kube, ours, reconcile_steps())
        if settled.status_patch:
            await kube.patch_tenant_status(tenant, settled.status_patch)
        post_events(body, settled)
        revision = (settled.outcome.status.get("runtimeConfig") or {}).get("revision")
        kopf.info(body, reason="PlanChanged",
                  message=f"plan {name} changed: reconciled, phase"
                          f" {settled.outcome.status['phase']}, config revision {revision}")

    # One list per plan edit. Not a kopf index: with worker_limit, kopf's wait for every
    # index to fill before handling deadlocks a restart with more tenants than workers.
    tenants = [body["metadata"]["name"] async for body in plan_users(kube, name)
               if not first_seen or waits_for_plan(body)]
    failed = await plans.roll_out(name, tenants, reconcile_one, ours.plan_rollout_per_second,
                                  ours.worker_limit)
    log.info("plan %s: %d tenant(s) reconciled, %d failed (their resync retries)", name,
             len(tenants) - len(failed), len(failed))


@kopf.on.delete(GROUP, VERSION, "tenants")
async def tenant_deleted(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int,
                         **_: Any) -> None:
    name = body["metadata"]["name"]
    METRICS.deleting(name)
    async with tenant_lock(name), reconcile_slot(get_settings().worker_limit):
        try:
            done = await finalizer.finalize(body, memo["kube"], get_settings())
        except finalizer.FinalizationBlocked as err:
            # Visible in `kubectl get tnt` and as an Event; retried with a growing delay.
            patch.status["phase"] = "Deleting"
            patch.status["conditions"] = merge_conditions(
                (body.get("status") or {}).get("conditions") or [],
                [Condition("Finalized", False, "CleanupBlocked", str(err))],
                int(body["metadata"].get("generation", 0)))
            kopf.warn(body, reason="FinalizationBlocked", message=str(err))
            raise kopf.TemporaryError(str(err), delay=finalizer.retry_delay(retry)) from err
    if done.skipped:  # the audited override: who asked, and what was left behind
        message = (f"{ANNOTATION_FORCE_FINALIZE}={done.force_reason!r} skipped: "
                   + "; ".join(done.skipped))
        log.warning("tenant %s: %s", name, message)
        kopf.warn(body, reason="ForcedFinalization", message=message)
    # The last status and an Event say where retained data was left.
    patch.status["phase"] = "Deleting"
    patch.status["retained"] = {"location": done.summary}
    kopf.info(body, reason="Finalized", message=done.summary)
    METRICS.forget(name)
    forget_tenant(body["metadata"].get("uid", ""))


from . import endpoint_secret_watch  # noqa: E402, F401 - registers its handlers
