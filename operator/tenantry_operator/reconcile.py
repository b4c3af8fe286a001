"""Runs the step list for one Tenant and computes its status; knows nothing of kopf."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from tenantry_runtime.contracts.database import InvalidTenantId, validate_tenant_id

from .alerts import CONDITION as BUDGET_ALERT
from .alerts import alert_condition, forget_budget_alert, latest_budget_alert, reconcile_patched
from .conditions import (
    Condition,
    Transition,
    latest_conditions,
    merge_conditions,
    ready_condition,
    status_changes,
    transitions,
)
from .kube import ForeignObject, Kube, TenantPlan, as_dict
from .model import EffectiveSpec, PlanSpec, PlanViolation, TenantSpec, effective_spec
from .outages import unreachable_condition
from .settings import OperatorSettings
from .steps import Step, StepContext, StepFailed

log = logging.getLogger(__name__)

# Per event loop: an asyncio.Lock belongs to one loop (tests reconcile from a second one).
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def tenant_lock(name: str) -> asyncio.Lock:
    """Event handlers and the resync timer may fire together; one reconcile per tenant at once."""
    return _locks.setdefault(asyncio.get_running_loop(), {}).setdefault(name, asyncio.Lock())


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


def reconcile_slot(limit: int) -> asyncio.Semaphore:
    """At most `limit` reconciles at once (kopf's handlers, plan roll-outs and deletions), taken
    under the tenant's lock so a tenant waiting for its lock holds no slot."""
    return _slots.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(limit))


@dataclass
class Outcome:
    """The status to write, and whether (and when) to try again."""

    status: dict[str, Any]
    retry_after: float | None = None
    spec: EffectiveSpec | None = None  # the plan-merged spec, when the plan resolved (metrics)


async def resolve_spec(
    body: Mapping[str, Any], kube: Kube
) -> tuple[EffectiveSpec | None, Condition, bool]:
    """(effective spec, PlanResolved condition, retryable); spec is None when unresolved."""
    meta = body["metadata"]
    try:  # the CRD refuses such names; an older CRD may not
        validate_tenant_id(meta["name"])
    except InvalidTenantId as err:
        return None, Condition("PlanResolved", False, "InvalidTenantName", str(err)), False
    tenant = TenantSpec.from_body(body.get("spec", {}))
    plan_obj = await kube.read(TenantPlan, tenant.plan)
    if plan_obj is None:
        msg = f"TenantPlan {tenant.plan!r} does not exist"
        return None, Condition("PlanResolved", False, "PlanNotFound", msg), True
    try:
        plan = PlanSpec.model_validate(as_dict(plan_obj).get("spec", {}))
        spec = effective_spec(meta["name"], meta["uid"], meta.get("generation", 0), tenant, plan)
    except PlanViolation as err:
        return None, Condition("PlanResolved", False, err.reason, str(err)), False
    except ValidationError as err:
        return None, Condition("PlanResolved", False, "InvalidPlan", str(err)), True
    return spec, Condition("PlanResolved", True, "Resolved", f"plan {tenant.plan}"), False


def condition_type(step: Step) -> str:
    """`ensure_runtime_config` reports `RuntimeConfigReady`."""
    words = step.__name__.removeprefix("ensure_").split("_")
    return "".join(w.capitalize() for w in words) + "Ready"


# Reasons that need a person to act: retrying alone will not fix them.
FAILED_REASONS = frozenset({
    "IsolationNotAllowed", "IsolationLowered", "NamespaceConflict", "ResourceConflict",
    "InvalidTenantName", "CredentialsLost", "VolumeExpansionNotAllowed",
    "VolumeShrinkNotSupported", "MaxTokensAboveRateLimit", "EndpointKeyMissing",
    "EndpointNotAllowed",
})


def phase_of(spec: EffectiveSpec | None, conditions: Sequence[Condition]) -> str:
    if all(c.ok for c in conditions):
        return "Suspended" if spec is not None and spec.suspended else "Ready"
    if any(c.reason in FAILED_REASONS for c in conditions):
        return "Failed"
    if any(c.type == "MigrationComplete" and not c.ok for c in conditions):
        return "Migrating"
    return "Provisioning"


async def reconcile(
    body: Mapping[str, Any], kube: Kube, settings: OperatorSettings, steps: Sequence[Step]
) -> Outcome:
    """Resolve the plan, run every step in order, stop at the first that cannot converge."""
    status: dict[str, Any] = dict(body.get("status") or {})
    generation = int(body["metadata"].get("generation", 0))
    spec, plan_cond, retryable = await resolve_spec(body, kube)
    observed = [plan_cond]
    retry: float | None = 30.0 if retryable else None
    provisioned: dict[str, str] = dict(status.get("provisioned") or {})
    if spec is not None:
        ctx = StepContext(spec=spec, kube=kube, settings=settings, status=status,
                          provisioned=provisioned)
        for step in steps:
            try:
                observed.append(await step(ctx))
            except StepFailed as err:
                observed.append(err.condition)
                retry = err.retry_after
                break
            except ForeignObject as err:  # never adopt what someone else created
                reason = "NamespaceConflict" if err.kind == "Namespace" else "ResourceConflict"
                observed.append(Condition(condition_type(step), False, reason, str(err)))
                retry = 60.0
                break
            except Exception as err:  # any failure becomes a visible condition, then a retry
                log.warning("tenant %s: %s failed: %s", spec.name, step.__name__, err)
                observed.append(unreachable_condition(condition_type(step), err) or Condition(
                    condition_type(step), False, type(err).__name__, str(err)[:1000]))
                retry = 10.0
                break
    ready = ready_condition(observed)
    current_conditions = status.get("conditions") or []
    conditions = merge_conditions(current_conditions,
                                  [*observed, ready, budget_condition(current_conditions)],
                                  generation)
    new_status: dict[str, Any] = {
        "phase": phase_of(spec, observed),
        "observedGeneration": generation,
        "conditions": conditions,
        "provisioned": provisioned,
    }
    if spec is not None:
        new_status.update(ctx.status_updates)
    return Outcome(status=new_status, retry_after=retry, spec=spec)


def budget_condition(current: Sequence[Mapping[str, Any]]) -> Condition:
    """BudgetAlert is the alert loop's (alerts.py); the reconcile's status patch carries it too,
    so that loop writes only when a claim changes it: a new Tenant starts within its budgets
    (without this, one more status PATCH per new Tenant), and an existing value moves to the new
    generation with the other conditions (one more per spec change). `current` has the one the
    alert loop last wrote, when it wrote one (reconcile_tenant)."""
    old = next((c for c in current if c.get("type") == BUDGET_ALERT), None)
    if old is None:
        return alert_condition(())
    return Condition(BUDGET_ALERT, old.get("status") == "True", str(old.get("reason", "")),
                     str(old.get("message", "")))


@dataclass
class Settled:
    """One reconcile of a Tenant, as writes: a status patch and Events, both empty when the
    Tenant was already settled."""

    outcome: Outcome
    status_patch: dict[str, Any]
    events: list[Transition]


# Per event loop, by Tenant uid: the conditions its last reconcile computed (not the alert
# loop's BudgetAlert, which that loop writes on its own). Dropped when the Tenant is gone.
_computed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, list[dict[str, Any]]]] = (
    weakref.WeakKeyDictionary())


def computed_conditions() -> dict[str, list[dict[str, Any]]]:
    return _computed.setdefault(asyncio.get_running_loop(), {})


async def reconcile_tenant(
    body: Mapping[str, Any], kube: Kube, settings: OperatorSettings, steps: Sequence[Step]
) -> Settled:
    """Reconcile under the tenant's lock; compare the result with the status it had.

    "Had": the body's conditions, or those the previous reconcile computed when the body
    predates it (`latest_conditions`); the status patch is still against the body.
    """
    uid = body["metadata"].get("uid", "")
    current: Mapping[str, Any] = body.get("status") or {}
    async with tenant_lock(body["metadata"]["name"]), reconcile_slot(settings.worker_limit):
        # BudgetAlert is the alert loop's to change (the reconcile only carries it): the one
        # that loop last wrote, else the body's; its Events come from that loop.
        before = latest_conditions(current.get("conditions") or [],
                                   [*computed_conditions().get(uid, []),
                                    *latest_budget_alert(uid)])
        outcome = await reconcile({**body, "status": {**current, "conditions": before}}, kube,
                                  settings, steps)
        merged = [c for c in outcome.status["conditions"] if c["type"] != BUDGET_ALERT]
        computed_conditions()[uid] = merged
        status_patch = status_changes(current, outcome.status)
        reconcile_patched(uid, status_patch)  # the alert loop waits until it has landed
    return Settled(outcome=outcome, status_patch=status_patch,
                   events=transitions(before, merged))


def forget_tenant(uid: str) -> None:
    """The Tenant is gone: drop what its reconciles and its alerts remembered."""
    computed_conditions().pop(uid, None)
    forget_budget_alert(uid)
