"""Reconcile steps: each ensures one thing, is idempotent, and reports a Condition."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lightkube.resources.core_v1 import Namespace
from lightkube.types import PatchType
from tenantry_runtime.api_keys import ApiKeyRecord

from . import builders
from .conditions import Condition
from .kube import NOT_READ, Kind, Kube, as_dict
from .model import GROUP, EffectiveSpec
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
    # Revision of the runtime config and Redis limits, settled once per reconcile.
    config_revision: int | None = None
    # The live runtime ConfigMap as settle_revision read it (None: absent), applied over by
    # ensure_runtime_config without a second read.
    live_config_map: Any = None
    # A pool tenant's collection table (or why it could not be made), made by ensure_database
    # on the connection it used for the registry row (one checkout per pool tenant).
    pool_collection: str | Exception | None = None
    # The hashes of the tenant's API keys (never the keys), set by ensure_api_keys.
    api_keys: tuple[ApiKeyRecord, ...] = ()
    # ensure_namespace created the namespace in this reconcile: nothing is in it yet, so
    # objects in it are created without reading them first.
    fresh_namespace: bool = False

    @property
    def namespace(self) -> str:
        return namespace_name(self.spec.name, self.settings.namespace_prefix)

    async def live(self, kind: Kind, name: str) -> dict[str, Any] | None:
        """An object of the tenant's namespace as it is now (None: absent)."""
        return None if self.fresh_namespace else await self.kube.read(kind, name, self.namespace)

    async def apply(self, manifest: dict[str, Any]) -> Any:
        """Kube.apply, without its read in a namespace this reconcile created."""
        fresh = (self.fresh_namespace
                 and manifest["metadata"].get("namespace") == self.namespace)
        return await self.kube.apply(manifest, live=None if fresh else NOT_READ)


Step = Callable[[StepContext], Awaitable[Condition]]


class StepFailed(Exception):
    """A step could not converge yet; carries the condition to report and when to retry."""

    def __init__(self, condition: Condition, retry_after: float = 15.0) -> None:
        super().__init__(condition.message)
        self.condition = condition
        self.retry_after = retry_after


async def ensure_namespace(ctx: StepContext) -> Condition:
    # Kube.apply refuses a namespace that is not this tenant's (ForeignObject: NamespaceConflict).
    live = await ctx.kube.read(Namespace, ctx.namespace)
    applied = as_dict(await ctx.kube.apply(
        builders.tenant_namespace(ctx.spec, ctx.settings.namespace_prefix), live=live))
    ctx.fresh_namespace = live is None
    await drop_tenant_owner_references(ctx.kube, ctx.namespace, applied)
    ctx.provisioned["namespace"] = ctx.namespace
    return Condition("NamespaceReady", True, "Applied", f"namespace {ctx.namespace} is in place")


async def delete_namespace(kube: Kube, name: str) -> bool:
    return await kube.delete(Namespace, name)


async def drop_tenant_owner_references(kube: Kube, name: str, namespace: dict[str, Any]) -> None:
    """Remove an owner reference to a Tenant (set by older versions): through it the garbage
    collector would delete the namespace on a cascading deletion before Retain could apply."""
    owners = namespace.get("metadata", {}).get("ownerReferences") or []
    kept = [o for o in owners if not str(o.get("apiVersion", "")).startswith(f"{GROUP}/")]
    if len(kept) != len(owners):
        await kube.client.patch(Namespace, name, {"metadata": {"ownerReferences": kept or None}},
                                patch_type=PatchType.MERGE)
