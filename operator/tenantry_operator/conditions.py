"""Status conditions that follow the Kubernetes API conventions; pure functions only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Condition:
    type: str
    ok: bool
    reason: str
    message: str = ""

    @property
    def status(self) -> str:
        return "True" if self.ok else "False"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    current: Sequence[Mapping[str, Any]],
    observed: Iterable[Condition],
    generation: int,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """New condition list: lastTransitionTime moves only when a condition's status changes."""
    stamp = now or now_rfc3339()
    by_type = {c["type"]: dict(c) for c in current}
    for cond in observed:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status
        by_type[cond.type] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": stamp if changed or old is None else old["lastTransitionTime"],
        }
    # Ready first, then alphabetical: stable order keeps status patches minimal.
    return sorted(by_type.values(), key=lambda c: (c["type"] != "Ready", c["type"]))


def latest_conditions(
    stored: Sequence[Mapping[str, Any]], computed: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Pure: the stored conditions, each replaced by the one computed last, if any.

    A reconcile that waited for the tenant's lock holds a body from before the reconcile it
    waited for, whose status may not even be written yet: compared with those stale
    conditions, its own would look like transitions again (a second stamp, a second Event).
    """
    latest = {c["type"]: dict(c) for c in stored}
    latest.update({c["type"]: dict(c) for c in computed})
    return list(latest.values())


def ready_condition(steps: Sequence[Condition]) -> Condition:
    """Ready summarises the step conditions: true only when every step is."""
    failing = [c for c in steps if not c.ok]
    if not failing:
        return Condition("Ready", True, "Reconciled", "all resources are provisioned")
    first = failing[0]
    return Condition("Ready", False, first.reason, f"{first.type}: {first.message}")


@dataclass(frozen=True)
class Transition:
    """An Event to post about a Tenant: `kubectl describe tnt` then tells its story."""

    type: str  # Normal | Warning
    reason: str
    message: str


def transitions(
    current: Sequence[Mapping[str, Any]], merged: Sequence[Mapping[str, Any]]
) -> list[Transition]:
    """Pure: the Events for what changed between two condition lists.

    A condition that turns False, or fails for another reason, is a Warning of its own (its
    reason, its message). Those that turn True share one Normal Event: `Ready` when Ready is
    among them, else `Progressing`. Nothing changed, nothing to post.
    """
    before = {c["type"]: c for c in current}
    events: list[Transition] = []
    became_true: list[str] = []
    for cond in merged:
        old = before.get(cond["type"])
        if cond["status"] == "True":
            if old is None or old.get("status") != "True":
                became_true.append(cond["type"])
        # Ready repeats the failing step's condition: no Event of its own.
        elif cond["type"] != "Ready" and (
                old is None
                or (old.get("status"), old.get("reason")) != ("False", cond["reason"])):
            events.append(Transition("Warning", cond["reason"],
                                     f"{cond['type']}: {cond['message']}"))
    if became_true:
        ready = "Ready" in became_true
        steps = [t for t in became_true if t != "Ready"]
        message = "all resources are provisioned" if ready else "progress"
        if steps:
            message += f" ({', '.join(steps)} True)"
        events.insert(0, Transition("Normal", "Ready" if ready else "Progressing", message))
    return events


def status_changes(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the JSON merge patch that turns `current` into `desired` for desired's keys.

    Empty when nothing changed: a settled reconcile writes no status. Keys of a nested
    object that `desired` no longer has are removed (None); top-level keys it does not
    mention (written by others, e.g. the finalizer's `retained`) are left alone.
    """
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        old = current.get(key)
        if old == value:
            continue
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = status_changes(old, value)
            nested.update({k: None for k in old if k not in value})
            patch[key] = nested
        else:
            patch[key] = value
    return patch
