"""Thin async Kubernetes access: server-side apply of plain dicts, tolerant get and delete."""

from __future__ import annotations

from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig, codecs
from lightkube.core.resource import GlobalResource, NamespacedResource
from lightkube.generic_resource import create_global_resource
from lightkube.types import PatchType

from .model import GROUP, VERSION
from .names import FIELD_MANAGER, LABEL_MANAGED_BY, LABEL_TENANT, MANAGER, owned_by

Tenant = create_global_resource(GROUP, VERSION, "Tenant", "tenants")
TenantPlan = create_global_resource(GROUP, VERSION, "TenantPlan", "tenantplans")

Manifest = dict[str, Any]
Kind = type[GlobalResource] | type[NamespacedResource]


def _not_found(err: ApiError) -> bool:
    return err.status.code == 404


class ForeignObject(Exception):
    """An object the operator would apply already exists and does not carry its tenant's marks."""

    def __init__(self, kind: str, name: str, namespace: str | None, tenant: str) -> None:
        where = f"{namespace}/{name}" if namespace else name
        super().__init__(
            f"{kind} {where} already exists and was not created by Tenantry for tenant {tenant}"
            f" (labels {LABEL_MANAGED_BY}={MANAGER} and {LABEL_TENANT}={tenant} missing);"
            " Tenantry neither adopts nor deletes it. Remove or rename it, or label it with"
            " both labels to hand it over")
        self.kind = kind


class Kube:
    """The one place that talks to the API server; builders hand it plain manifests."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        # lightkube's overloads split global and namespaced kinds; these wrappers take both.
        self._untyped: Any = client

    @classmethod
    def from_env(cls) -> Kube:
        """In-cluster service account, or $KUBECONFIG / ~/.kube/config outside the cluster."""
        return cls(AsyncClient(config=KubeConfig.from_env(), field_manager=FIELD_MANAGER))

    async def apply(self, manifest: Manifest) -> Any:
        """Create or converge an object; force takes ownership of fields a human changed.

        A manifest labelled for a tenant is applied only over an object that is already that
        tenant's (or none): forcing would silently adopt a namespace or Secret made by someone
        else, and deletion would later remove it.
        """
        obj = codecs.from_dict(manifest)
        meta = manifest["metadata"]
        tenant = (meta.get("labels") or {}).get(LABEL_TENANT)
        if tenant is not None:
            existing = await self.get(type(obj), meta["name"], meta.get("namespace"))
            if existing is not None and not owned_by(labels_of(existing), tenant):
                raise ForeignObject(manifest["kind"], meta["name"], meta.get("namespace"), tenant)
        return await self.client.apply(obj, field_manager=FIELD_MANAGER, force=True)

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Any:
        """The object, or None when it does not exist."""
        try:
            return await self._untyped.get(kind, name, namespace=namespace)
        except ApiError as err:
            if _not_found(err):
                return None
            raise

    async def delete(self, kind: Kind, name: str, namespace: str | None = None) -> bool:
        """Delete if present; True when something was deleted."""
        try:
            await self._untyped.delete(kind, name, namespace=namespace)
        except ApiError as err:
            if _not_found(err):
                return False
            raise
        return True

    async def patch_tenant_status(self, name: str, status: dict[str, Any]) -> None:
        """Merge-patch a Tenant's status now (progress that must not wait for the handler)."""
        await self.client.patch(Tenant.Status, name, {"status": status},
                                patch_type=PatchType.MERGE)

    async def close(self) -> None:
        await self.client.close()


def as_dict(obj: Any) -> dict[str, Any]:
    """A lightkube object (typed or generic) as a plain dict."""
    result: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return result


def labels_of(obj: Any) -> dict[str, str]:
    labels: dict[str, str] = (as_dict(obj).get("metadata") or {}).get("labels") or {}
    return labels
