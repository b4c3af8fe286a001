"""Reconcile steps: each ensures one thing, is idempotent, and reports a Condition."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lightkube.resources.core_v1 import Namespace

from . import builders
from .conditions import Condition
from .kube import Kube
from .model import EffectiveSpec
from .names import namespace_name
from .settings import OperatorSettings


@dataclass
class StepContext:
    """What every step sees; steps record what they provisioned in `provisioned`."""

    spec: EffectiveSpec
    kube: Kube
    settings: OperatorSettings
    status: dict[str, Any]
    provisioned: dict[str, str] = field(default_factory=dict)
    status_updates: dict[str, Any] = field(default_factory=dict)  # e.g. migration progress
    # Admin DSN of the database holding the tenant's data, set by ensure_database. Never
    # written to status: it may carry a password.
    database_dsn: str | None = None

    @property
    def namespace(self) -> str:
        return namespace_name(self.spec.name, self.settings.namespace_prefix)


Step = Callable[[StepContext], Awaitable[Condition]]


class StepFailed(Exception):
    """A step could not converge yet; carries the condition to report and when to retry."""

    def __init__(self, condition: Condition, retry_after: float = 15.0) -> None:
        super().__init__(condition.message)
        self.condition = condition
        self.retry_after = retry_after


async def ensure_namespace(ctx: StepContext) -> Condition:
    await ctx.kube.apply(builders.tenant_namespace(ctx.spec, ctx.settings.namespace_prefix))
    ctx.provisioned["namespace"] = ctx.namespace
    return Condition("NamespaceReady", True, "Applied", f"namespace {ctx.namespace} is in place")


async def delete_namespace(kube: Kube, name: str) -> bool:
    return await kube.delete(Namespace, name)
