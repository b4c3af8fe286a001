"""Thin kopf glue: run the reconciler on every change and on a timer, finalize on delete."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from . import finalize as finalizer
from . import maintenance
from .conditions import Condition, merge_conditions
from .kube import Kube
from .model import GROUP, VERSION
from .names import ANNOTATION_FORCE_FINALIZE
from .pipeline import reconcile_steps
from .reconcile import reconcile, tenant_lock
from .settings import get_settings

FINALIZER = f"{GROUP}/cleanup"
log = logging.getLogger(__name__)


# Startup migrates the shared database; while Postgres is down it is retried every 5 s (kopf's
# default of 60 s left a restarted operator idle for a minute after Postgres came back).
@kopf.on.startup(backoff=5)
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = get_settings()
    # Bounded concurrency: kopf's default worker limit is unbounded.
    settings.queueing.worker_limit = ours.worker_limit
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
    memo["kube"] = Kube.from_env()
    await maintenance.on_startup(ours)
    memo["maintenance"] = asyncio.create_task(maintenance.keep_partitions_ahead(ours))


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("maintenance")
    if task is not None:
        task.cancel()
    kube = memo.get("kube")
    if kube is not None:
        await kube.close()


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    async with tenant_lock(body["metadata"]["name"]):
        outcome = await reconcile(body, memo["kube"], get_settings(), reconcile_steps())
    patch.status.update(outcome.status)
    if outcome.permanent_error:
        kopf.warn(body, reason="PlanViolation", message=outcome.permanent_error)
    elif outcome.retry_after is not None:
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


@kopf.on.delete(GROUP, VERSION, "tenants")
async def tenant_deleted(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int,
                         **_: Any) -> None:
    name = body["metadata"]["name"]
    async with tenant_lock(name):
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
