"""Thin async Kubernetes access: server-side apply of plain dicts, tolerant get and delete."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig, codecs
from lightkube.core.resource import GlobalResource, NamespacedResource
from lightkube.generic_resource import create_global_resource
from lightkube.resources.core_v1 import (
    ConfigMap,
    LimitRange,
    Namespace,
    ResourceQuota,
    Secret,
    ServiceAccount,
)
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.types import PatchType
from lightkube.utils.quantity import parse_quantity

from .cache import MISS, Caches
from .fastpath import FastPath
from .model import GROUP, VERSION
from .names import FIELD_MANAGER, LABEL_MANAGED_BY, LABEL_TENANT, MANAGER, owned_by

Tenant = create_global_resource(GROUP, VERSION, "Tenant", "tenants")
TenantPlan = create_global_resource(GROUP, VERSION, "TenantPlan", "tenantplans")

Manifest = dict[str, Any]
Kind = type[GlobalResource] | type[NamespacedResource]
# A digest of the manifest last applied (Secret data excluded): a field dropped from a builder
# changes it, so the next apply removes that field although the live object still holds it.
APPLIED_HASH_ANNOTATION = f"{GROUP}/applied-hash"
_PAYLOAD_FIELDS = ("data", "stringData", "binaryData")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """Pure: a digest of what an apply asks for, payloads (Secret and ConfigMap data) aside:
    those are compared in full, and a digest of a Secret's data would sit in its metadata."""
    shape = {k: v for k, v in manifest.items() if k not in _PAYLOAD_FIELDS}
    meta = dict(shape.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k != APPLIED_HASH_ANNOTATION}
    meta["annotations"] = annotations
    shape["metadata"] = meta
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:32]


def stamped(manifest: Mapping[str, Any]) -> Manifest:
    """The manifest with its digest annotation, as it is applied."""
    result = copy.deepcopy(dict(manifest))
    meta = result.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}),
                           APPLIED_HASH_ANNOTATION: manifest_digest(manifest)}
    return result


def _same_scalar(live: Any, wanted: Any) -> bool:
    if live == wanted:
        return True
    # The API server normalises quantities ("1000m" reads back as "1").
    if isinstance(live, str | int) and isinstance(wanted, str | int):
        try:
            return parse_quantity(str(live)) == parse_quantity(str(wanted))
        except ValueError:
            return False
    return False


def contains(live: Any, wanted: Any) -> bool:
    """Pure: whether the live value holds every field of `wanted` (the server adds defaults)."""
    if isinstance(wanted, Mapping):
        # An empty value reads back as absent.
        return isinstance(live, Mapping) and all(
            contains(live[key], value) if key in live else value in (None, {}, [], "")
            for key, value in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(live, list) and len(live) == len(wanted)
                and all(contains(a, b) for a, b in zip(live, wanted, strict=True)))
    return _same_scalar(live, wanted)


def _decoded(data: Mapping[str, str]) -> dict[str, str] | None:
    try:
        return {k: base64.b64decode(v, validate=True).decode() for k, v in data.items()}
    except (binascii.Error, UnicodeDecodeError):
        return None


def up_to_date(live: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    """Pure: applying the stamped `manifest` over `live` would change nothing.

    The digest annotation says the manifest is the one last applied; every field of it must
    still hold its value (a hand edit is repaired); payloads must match in full.
    """
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    if annotations.get(APPLIED_HASH_ANNOTATION) != manifest_digest(manifest):
        return False
    shape = {k: v for k, v in manifest.items() if k not in _PAYLOAD_FIELDS}
    if not contains(live, shape):
        return False
    live_data: Mapping[str, str] = live.get("data") or {}
    if "stringData" in manifest:  # the server stores it base64-encoded under data
        wanted = {**_decoded_or_empty(manifest.get("data") or {}), **manifest["stringData"]}
        return _decoded(live_data) == wanted
    return all(dict(live.get(f) or {}) == dict(manifest.get(f) or {})
               for f in ("data", "binaryData") if f in manifest or live.get(f))


def _decoded_or_empty(data: Mapping[str, str]) -> dict[str, str]:
    return _decoded(data) or {}


NOT_READ: Any = object()  # Kube.apply: the caller has not read the live object


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


def cached_kinds() -> dict[Kind, str | None]:
    """What the operator reads on every reconcile, and the label selector of each cache: the
    kinds it creates carry its managed-by label; TenantPlans are few and all read."""
    ours = f"{LABEL_MANAGED_BY}={MANAGER}"
    return {TenantPlan: None, Namespace: ours, ConfigMap: ours, Secret: ours,
            ResourceQuota: ours, LimitRange: ours, NetworkPolicy: ours, ServiceAccount: ours}


class Kube:
    """The one place that talks to the API server; builders hand it plain manifests."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        # lightkube's overloads split global and namespaced kinds; these wrappers take both.
        self._untyped: Any = client
        self.caches: Caches | None = None  # start_caches: reads served from watches
        self.fast: FastPath | None = None  # use_fast_path: aiohttp for GET and apply

    async def start_caches(self, wait_seconds: float = 60.0,
                           keep: Callable[[Any, str | None, str], bool] | None = None) -> bool:
        """Watch what the operator owns (cache.py); True once every cache is listed (until
        then, and whenever a watch is down, `read` asks the API server). `keep(kind,
        namespace, name)` limits what the caches hold (cache_scope.py)."""
        if self.caches is None:
            self.caches = Caches(self.client, cached_kinds(), keep)
            self.caches.start()
        return await self.caches.wait_listed(wait_seconds)

    def use_fast_path(self) -> bool:
        """GETs and applies over aiohttp (fastpath.py) when the credentials allow it."""
        self.fast = FastPath.for_client(self.client)
        return self.fast is not None

    def _cache(self, kind: Any) -> Any:
        return self.caches.by_kind.get(kind) if self.caches is not None else None

    async def read(self, kind: Kind, name: str, namespace: str | None = None
                   ) -> dict[str, Any] | None:
        """The object as a plain dict, or None when it does not exist: from the cache when it
        knows, else from the API server."""
        cache = self._cache(kind)
        if cache is not None:
            hit = cache.get(name, namespace)
            if hit is not MISS:
                found: dict[str, Any] | None = hit
                return found
        if self.fast is not None:
            result = await self.fast.get(kind, name, namespace)
        else:
            obj = await self.get(kind, name, namespace)
            result = as_dict(obj) if obj is not None else None
        if result is None:
            return None
        if cache is not None:
            cache.put(result)
        return result

    @classmethod
    def from_env(cls) -> Kube:
        """In-cluster service account, or $KUBECONFIG / ~/.kube/config outside the cluster."""
        return cls(AsyncClient(config=KubeConfig.from_env(), field_manager=FIELD_MANAGER))

    async def apply(self, manifest: Manifest, live: Any = NOT_READ) -> Any:
        """Create or converge an object; force takes ownership of fields a human changed.

        Read first, write only when something differs (`up_to_date`): a settled reconcile
        makes no write. A manifest labelled for a tenant is applied only over an object that
        is already that tenant's (or none): forcing would silently adopt a namespace or Secret
        made by someone else, and deletion would later remove it. `live`: the object as the
        caller just read it (None: absent), to spare a second read.
        """
        desired = stamped(manifest)
        kind: Any = codecs.resource_registry.load(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        tenant = (meta.get("labels") or {}).get(LABEL_TENANT)
        existing = (await self.read(kind, meta["name"], meta.get("namespace"))
                    if live is NOT_READ else live)
        if existing is not None:
            if tenant is not None and not owned_by(labels_of(existing), tenant):
                raise ForeignObject(manifest["kind"], meta["name"], meta.get("namespace"), tenant)
            if up_to_date(as_dict(existing), manifest):
                return existing
        if self.fast is not None:
            applied = await self.fast.apply(kind, desired, FIELD_MANAGER)
        else:
            applied = as_dict(await self.client.apply(codecs.from_dict(desired),
                                                      field_manager=FIELD_MANAGER, force=True))
        cache = self._cache(kind)
        if cache is not None:  # read after write: the watch event may come later
            cache.put(applied)
        return applied

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Any:
        """The object, or None when it does not exist."""
        try:
            return await self._untyped.get(kind, name, namespace=namespace)
        except ApiError as err:
            if _not_found(err):
                return None
            raise

    async def delete(self, kind: Kind, name: str, namespace: str | None = None) -> bool:
        """Delete if present; True when something was deleted.

        The cache learns at once: a terminating object (finalizers) is stored as the server
        answered, a deleted one leaves a tombstone that refuses its late watch events.
        """
        cache = self._cache(kind)
        generic: Any = self.client._client  # lightkube's delete drops the server's answer
        request = generic.prepare_request("delete", res=kind, name=name, namespace=namespace)
        try:
            response = await generic.send(generic.build_adapter_request(request))
            generic.raise_for_status(response)
        except ApiError as err:
            if _not_found(err):
                if cache is not None:
                    cache.deleted(name, namespace, None)
                return False
            if cache is not None:  # outcome unknown: the next read asks the API server
                cache.forget(name, namespace)
            raise
        except Exception:
            if cache is not None:
                cache.forget(name, namespace)
            raise
        if cache is not None:
            try:
                answer = json.loads(response.content)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                cache.deleted(name, namespace, answer)
            else:
                cache.forget(name, namespace)
        return True

    async def patch_tenant_status(self, name: str, status: dict[str, Any]) -> None:
        """Merge-patch a Tenant's status now (progress that must not wait for the handler)."""
        await self.client.patch(Tenant.Status, name, {"status": status},
                                patch_type=PatchType.MERGE)

    async def close(self) -> None:
        if self.caches is not None:
            await self.caches.stop()
        if self.fast is not None:
            await self.fast.close()
        await self.client.close()


def as_dict(obj: Any) -> dict[str, Any]:
    """A lightkube object (typed or generic) as a plain dict."""
    result: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return result


def labels_of(obj: Any) -> dict[str, str]:
    labels: dict[str, str] = (as_dict(obj).get("metadata") or {}).get("labels") or {}
    return labels
