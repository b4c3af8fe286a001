"""Deletion of a tenant, by its deletionPolicy and the names recorded in its status."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import psycopg
from lightkube.resources.apps_v1 import StatefulSet
from lightkube.resources.core_v1 import Namespace, PersistentVolumeClaim
from lightkube.types import PatchType
from redis.asyncio import Redis

from . import builders, database, dataplane
from .kube import Kube
from .quotas import delete_tenant_keys
from .settings import OperatorSettings

log = logging.getLogger(__name__)


def _shared_dsn(settings: OperatorSettings) -> str:
    if settings.database_url is None:
        raise RuntimeError("TENANTRY_DATABASE_URL is not set")
    return settings.database_url.get_secret_value()


async def _orphan_namespace(kube: Kube, name: str) -> None:
    """Drop the owner reference so the garbage collector keeps the namespace after the Tenant."""
    patch = {"metadata": {"ownerReferences": None, "labels": {"tenantry.dev/retained": "true"}}}
    await kube.client.patch(Namespace, name, patch, patch_type=PatchType.MERGE)


async def _delete_silo(kube: Kube, namespace: str) -> None:
    """The StatefulSet first, then its claims (the namespace's deletion takes the rest)."""
    await kube.delete(StatefulSet, builders.SILO_NAME, namespace)
    claims = kube.client.list(PersistentVolumeClaim, namespace=namespace,
                              labels={"app.kubernetes.io/name": builders.SILO_NAME})
    async for claim in claims:
        if claim.metadata and claim.metadata.name:
            await kube.delete(PersistentVolumeClaim, claim.metadata.name, namespace)


async def _silo_data(kube: Kube, settings: OperatorSettings, tenant: str, namespace: str,
                     delete: bool) -> str:
    """Lock the tenant out of its silo database (Retain) or drop its data (Delete).

    Best effort: with Delete the volumes go next anyway, and a silo that is down must not
    block the deletion of its Tenant forever.
    """
    try:
        dsn = await dataplane.silo_dsn(kube, settings, tenant, namespace)

        def work(conn: psycopg.Connection[Any]) -> str:
            if delete:
                database.delete_tenant_data(conn, tenant)
                return "dropped its data in the silo database"
            return "silo database " + database.retain_tenant(conn, tenant)

        return await database.in_database(dsn, work)
    except Exception as err:
        log.warning("tenant %s: silo database unreachable during deletion: %s", tenant, err)
        return f"silo database unreachable ({type(err).__name__}); its volumes decide its fate"


async def finalize(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> str:
    """Tear down by the names recorded in status (never re-derived); returns a summary."""
    name = body["metadata"]["name"]
    spec = body.get("spec", {})
    provisioned: Mapping[str, str] = (body.get("status") or {}).get("provisioned") or {}
    delete = spec.get("deletionPolicy", "Retain") == "Delete"
    namespace = provisioned.get("namespace")
    notes: list[str] = []
    if settings.redis_url is not None:
        redis = Redis.from_url(settings.redis_url.get_secret_value())
        try:
            removed = await delete_tenant_keys(redis, name)
        finally:
            await redis.aclose()
        notes.append(f"removed {removed} Redis keys")
    if settings.database_url is not None and provisioned.get("databaseLocation"):
        if delete:
            await database.in_database(_shared_dsn(settings),
                                       lambda c: database.delete_tenant_data(c, name))
            notes.append("dropped its schema, role and shared rows")
        else:
            notes.append(await database.in_database(_shared_dsn(settings),
                                                    lambda c: database.retain_tenant(c, name)))
    if namespace and provisioned.get("statefulSet"):
        notes.append(await _silo_data(kube, settings, name, namespace, delete))
    if namespace:
        if delete:
            if provisioned.get("statefulSet"):
                await _delete_silo(kube, namespace)
                notes.append("deleted the silo StatefulSet and its volumes")
            await kube.delete(Namespace, namespace)
            notes.append(f"deleted namespace {namespace}")
        elif await kube.get(Namespace, namespace) is not None:
            await _orphan_namespace(kube, namespace)
            kept = f"kept namespace {namespace}"
            if provisioned.get("statefulSet"):
                kept += " with the silo StatefulSet, its Secrets and volumes"
            notes.append(kept)
    return ("deleted: " if delete else "retained: ") + "; ".join(notes or ["nothing provisioned"])
