"""Startup bootstrap and deletion of a tenant, by its deletionPolicy and recorded names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightkube.resources.core_v1 import Namespace
from lightkube.types import PatchType

from .kube import Kube
from .settings import OperatorSettings


async def on_startup(settings: OperatorSettings) -> None:
    """Shared-database migrations are added by the data plane."""


async def _orphan_namespace(kube: Kube, name: str) -> None:
    """Drop the owner reference so the garbage collector keeps the namespace after the Tenant."""
    patch = {"metadata": {"ownerReferences": None, "labels": {"tenantry.dev/retained": "true"}}}
    await kube.client.patch(Namespace, name, patch, patch_type=PatchType.MERGE)


async def finalize(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> str:
    """Tear down by the names recorded in status (never re-derived); returns a summary."""
    spec = body.get("spec", {})
    provisioned: Mapping[str, str] = (body.get("status") or {}).get("provisioned") or {}
    policy = spec.get("deletionPolicy", "Retain")
    namespace = provisioned.get("namespace")
    kept: list[str] = []
    if namespace:
        if policy == "Delete":
            await kube.delete(Namespace, namespace)
        elif await kube.get(Namespace, namespace) is not None:
            await _orphan_namespace(kube, namespace)
            kept.append(f"namespace {namespace}")
    if policy == "Delete":
        return "deleted everything provisioned for the tenant"
    return "retained: " + (", ".join(kept) or "nothing was provisioned")
