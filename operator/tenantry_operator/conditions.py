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


def ready_condition(steps: Sequence[Condition]) -> Condition:
    """Ready summarises the step conditions: true only when every step is."""
    failing = [c for c in steps if not c.ok]
    if not failing:
        return Condition("Ready", True, "Reconciled", "all resources are provisioned")
    first = failing[0]
    return Condition("Ready", False, first.reason, f"{first.type}: {first.message}")
