"""Prometheus metrics of the operator, served on GET /metrics next to /healthz.

Reconcile outcomes and durations, tenants by phase, isolation upgrades in flight and each
tenant's token budgets (the dashboard divides the runtime's token counts by them). Only the
replica holding the Lease reconciles, so a standby exports the counters at zero and no
tenants; `tenantry_operator_leader` tells them apart. The text format comes from the
runtime's small families (no client library in either image).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from tenantry_runtime.metrics import CONTENT_TYPE, Family, Histogram

from .model import EffectiveSpec

__all__ = ["CONTENT_TYPE", "METRICS", "OperatorMetrics", "ReconcileResult"]

# A reconcile runs a handful of API calls and SQL statements; an isolation upgrade copies data.
RECONCILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
# reconcile.phase_of: the phases that mean "done", and the one that needs a person.
SETTLED_PHASES = frozenset({"Ready", "Suspended"})
FAILED_PHASE = "Failed"
UPGRADE_DONE = "Done"


class ReconcileResult(Protocol):
    """What the metrics read of reconcile.Outcome (a Protocol: no import cycle)."""

    status: dict[str, Any]
    spec: EffectiveSpec | None


@dataclass
class TenantState:
    phase: str
    upgrade_started: float | None = None  # unix seconds, while an isolation upgrade runs
    budgets: dict[str, int] = field(default_factory=dict)  # period -> tokens


def _unix_seconds(rfc3339: object) -> float | None:
    if not isinstance(rfc3339, str):
        return None
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def result_of(phase: str) -> str:
    """ready: nothing left to do; failed: a person must act; progressing: it retries alone."""
    if phase in SETTLED_PHASES:
        return "ready"
    return "failed" if phase == FAILED_PHASE else "progressing"


def ready_reason(status: Mapping[str, Any]) -> str | None:
    """The Ready condition's reason when it is not True, else None."""
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Ready":
            return None if condition.get("status") == "True" else str(condition.get("reason"))
    return "Unknown"


class OperatorMetrics:
    def __init__(self) -> None:
        self.reconciles = Family(
            "tenantry_operator_reconciles_total",
            "Reconciles of a Tenant by result: ready, progressing (retries on its own), failed "
            "(a person must act) or error (the reconcile raised).")
        self.failures = Family(
            "tenantry_operator_reconcile_failures_total",
            "Reconciles that left a Tenant not Ready, by the Ready condition's reason.")
        self.duration = Histogram(
            "tenantry_operator_reconcile_duration_seconds",
            "Time one reconcile of a Tenant took, by result.", RECONCILE_BUCKETS)
        self.tenants: dict[str, TenantState] = {}

    @contextmanager
    def reconciling(self, tenant: str, body: Mapping[str, Any]) -> Iterator[_Recorder]:
        """Times one reconcile; the caller hands the outcome to the recorder it gets. A
        reconcile that raises counts as an error, by exception type."""
        recorder = _Recorder(self, tenant, body, time.monotonic())
        try:
            yield recorder
        except Exception as err:
            self.reconciles.add(result="error")
            self.failures.add(reason=type(err).__name__)
            self.duration.observe(time.monotonic() - recorder.started, result="error")
            raise

    def record(self, tenant: str, body: Mapping[str, Any], outcome: ReconcileResult,
               seconds: float) -> None:
        status = outcome.status
        phase = str(status.get("phase", "Pending"))
        result = result_of(phase)
        self.reconciles.add(result=result)
        reason = ready_reason(status)
        if reason is not None:
            self.failures.add(reason=reason)
        self.duration.observe(seconds, result=result)
        # The status patch merges into the old one: a migration absent from this outcome is
        # still the Tenant's.
        migration = status.get("migration") or (body.get("status") or {}).get("migration") or {}
        state = TenantState(phase=phase)
        previous = self.tenants.get(tenant)
        if migration.get("step") not in (None, UPGRADE_DONE):
            known = previous.upgrade_started if previous is not None else None
            state.upgrade_started = (_unix_seconds(migration.get("startedAt")) or known
                                     or time.time())
        if outcome.spec is not None:
            state.budgets = {"daily": outcome.spec.ai.daily_tokens,
                             "monthly": outcome.spec.ai.monthly_tokens}
        elif previous is not None:  # plan unresolved this time: the budgets in force stay
            state.budgets = previous.budgets
        self.tenants[tenant] = state

    def deleting(self, tenant: str) -> None:
        state = self.tenants.setdefault(tenant, TenantState(phase="Deleting"))
        state.phase = "Deleting"

    def forget(self, tenant: str) -> None:
        self.tenants.pop(tenant, None)

    def render(self, *, leader: bool) -> bytes:
        by_phase = Family("tenantry_operator_tenants",
                          "Tenants this replica reconciles, by phase.", "gauge")
        upgrading = Family("tenantry_operator_upgrades_in_progress",
                           "Isolation upgrades started and not Done.", "gauge")
        started = Family("tenantry_operator_upgrade_started_timestamp_seconds",
                         "When each running isolation upgrade started (unix seconds).", "gauge")
        budgets = Family("tenantry_operator_tenant_budget_tokens",
                         "Each tenant's token budget in force, per UTC day or month.", "gauge")
        leading = Family("tenantry_operator_leader",
                         "1 on the replica holding the Lease (the one that reconciles).", "gauge")
        leading.add(1.0 if leader else 0.0)
        upgrading.add(0.0)
        for tenant, state in self.tenants.items():
            by_phase.add(phase=state.phase)
            if state.upgrade_started is not None:
                upgrading.add()
                started.add(state.upgrade_started, tenant=tenant)
            for period, tokens in state.budgets.items():
                budgets.add(tokens, tenant=tenant, period=period)
        lines: list[str] = []
        for family in (self.reconciles, self.failures, leading, by_phase, upgrading, started,
                       budgets):
            lines.extend(family.render())
        lines.extend(self.duration.render())
        return ("\n".join(lines) + "\n").encode()


@dataclass
class _Recorder:
    metrics: OperatorMetrics
    tenant: str
    body: Mapping[str, Any]
    started: float

    def __call__(self, outcome: ReconcileResult) -> None:
        self.metrics.record(self.tenant, self.body, outcome, time.monotonic() - self.started)


# One per process: kopf's handlers record into it, GET /metrics renders it.
METRICS = OperatorMetrics()
