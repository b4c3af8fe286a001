"""Deletion of a tenant, by its deletionPolicy and the names recorded in its status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from lightkube.resources.apps_v1 import StatefulSet
from lightkube.resources.core_v1 import Namespace, PersistentVolumeClaim, Secret
from lightkube.types import PatchType
from redis.asyncio import Redis

from . import api_keys, builders, capture, database, dataplane
from .kube import Kube, labels_of
from .names import ANNOTATION_FORCE_FINALIZE, namespace_name, owned_by
from .quotas import delete_tenant_keys
from .settings import OperatorSettings

log = logging.getLogger(__name__)


class FinalizationBlocked(Exception):
    """A part of the cleanup failed (its server unreachable); the deletion is retried."""


@dataclass
class Finalized:
    summary: str
    skipped: list[str] = field(default_factory=list)  # parts skipped by the force annotation
    force_reason: str | None = None


def retry_delay(retry: int) -> float:
    """Backoff between attempts of a blocked finalization: 5 s doubling up to 5 minutes."""
    return float(min(5 * 2 ** min(retry, 10), 300))


def blocked_message(tenant: str, problems: list[str]) -> str:
    return (f"deletion of tenant {tenant} waits for: {'; '.join(problems)}. It is retried with"
            " backoff. To finish the deletion without that cleanup (data or keys may be left"
            f" behind), record why: kubectl annotate tenant {tenant}"
            f" {ANNOTATION_FORCE_FINALIZE}='<reason>'")


def _shared_dsn(settings: OperatorSettings) -> str:
    if settings.database_url is None:
        raise RuntimeError("TENANTRY_DATABASE_URL is not set")
    return settings.database_url.get_secret_value()


async def _orphan_namespace(kube: Kube, name: str) -> None:
    """Drop any owner reference (set by older versions) and mark the namespace retained."""
    patch = {"metadata": {"ownerReferences": None, "labels": {"tenantry.dev/retained": "true"}}}
    await kube.client.patch(Namespace, name, patch, patch_type=PatchType.MERGE)


async def _owned_silo(kube: Kube, tenant: str, namespace: str) -> bool:
    sts = await kube.get(StatefulSet, builders.SILO_NAME, namespace)
    return sts is not None and owned_by(labels_of(sts), tenant)


async def _delete_silo(kube: Kube, tenant: str, namespace: str) -> None:
    """The StatefulSet first, then its claims (the namespace's deletion takes the rest)."""
    if await _owned_silo(kube, tenant, namespace):
        await kube.delete(StatefulSet, builders.SILO_NAME, namespace)
    for claim in await dataplane.silo_claims(kube, tenant, namespace):
        await kube.delete(PersistentVolumeClaim, claim["metadata"]["name"], namespace)


async def _delete_credential_backups(kube: Kube, settings: OperatorSettings, tenant: str) -> None:
    for secret in (builders.SILO_ADMIN_SECRET, builders.TENANT_DB_SECRET):
        for name in (builders.credentials_backup_name(tenant, secret),
                     builders.legacy_credentials_backup_name(tenant, secret)):
            backup = await kube.get(Secret, name, settings.credentials_namespace)
            labels = labels_of(backup) if backup is not None else {}
            if owned_by(labels, tenant) and labels.get(builders.CREDENTIAL_LABEL) == secret:
                await kube.delete(Secret, name, settings.credentials_namespace)


async def _silo_data(kube: Kube, settings: OperatorSettings, tenant: str, namespace: str,
                     delete: bool) -> str:
    """Lock the tenant out of its silo database (Retain) or drop its data (Delete)."""
    dsn = await dataplane.silo_dsn(kube, settings, tenant, namespace)

    def work(conn: psycopg.Connection[Any]) -> str:
        if delete:
            database.delete_tenant_data(conn, tenant)
            return "dropped its data in the silo database"
        return "silo database " + database.retain_tenant(conn, tenant)

    return await database.in_database(dsn, work)


async def finalize(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> Finalized:
    """Tear down by deletionPolicy; raise FinalizationBlocked while a part cannot be done.

    Every part is idempotent and runs on each attempt, whether or not status recorded it
    (a crash may have provisioned more than status says). Only objects that carry the
    tenant's marks are deleted or unlinked.
    """
    meta = body["metadata"]
    name = meta["name"]
    spec = body.get("spec", {})
    provisioned: Mapping[str, str] = (body.get("status") or {}).get("provisioned") or {}
    force = ((meta.get("annotations") or {}).get(ANNOTATION_FORCE_FINALIZE) or "").strip() or None
    delete = spec.get("deletionPolicy", "Retain") == "Delete"
    namespace = provisioned.get("namespace") or namespace_name(name, settings.namespace_prefix)
    done = Finalized(summary="", force_reason=force)
    notes: list[str] = []
    problems: list[str] = []

    async def part(what: str, work: Callable[[], Awaitable[str]]) -> None:
        try:
            notes.append(await work())
        except Exception as err:
            problem = f"{what} ({type(err).__name__}: {str(err)[:200]})"
            if force is None:
                log.warning("tenant %s: deletion blocked on %s", name, problem)
                problems.append(problem)
            else:
                log.warning("tenant %s: %s=%r skips %s", name, ANNOTATION_FORCE_FINALIZE, force,
                            problem)
                done.skipped.append(problem)
                notes.append(f"skipped {what} ({type(err).__name__}) by"
                             f" {ANNOTATION_FORCE_FINALIZE}")

    # First: the runtime stops serving the tenant (its keys stop working) whatever else waits.
    await part("removing the runtime's copy of the tenant",
               lambda: api_keys.forget_tenant(kube, settings, name))
    if settings.redis_url is not None:
        redis_url = settings.redis_url.get_secret_value()

        async def redis_keys() -> str:
            redis = Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
            try:
                # The registry of document ids follows the documents: kept under Retain.
                removed = await delete_tenant_keys(redis, name, documents=delete)
                return f"removed {removed} Redis keys"
            finally:
                await redis.aclose()

        await part("removing the tenant's Redis keys", redis_keys)
    if settings.database_url is not None:
        async def shared_database() -> str:
            # A move cut short by the deletion leaves no capture triggers nor change log.
            await database.in_database(_shared_dsn(settings),
                                       lambda c: capture.stop_capture(c, name))
            if delete:
                await database.in_database(_shared_dsn(settings),
                                           lambda c: database.delete_tenant_data(c, name))
                return "dropped its schema, role and shared rows"
            return await database.in_database(_shared_dsn(settings),
                                              lambda c: database.retain_tenant(c, name))

        await part("cleaning up the shared database", shared_database)
    live_namespace = await kube.get(Namespace, namespace)
    ours = live_namespace is not None and owned_by(labels_of(live_namespace), name)
    silo = ours and (bool(provisioned.get("statefulSet"))
                     or await _owned_silo(kube, name, namespace))
    if silo:
        if delete:  # best effort: the volumes go next anyway
            try:
                notes.append(await _silo_data(kube, settings, name, namespace, delete))
            except Exception as err:
                log.warning("tenant %s: silo database unreachable during deletion: %s", name, err)
                notes.append(f"silo database unreachable ({type(err).__name__}); its volumes"
                             " are deleted")
        else:  # its role must not keep its login
            await part("locking the tenant out of its silo database",
                       lambda: _silo_data(kube, settings, name, namespace, delete))
    if problems:
        raise FinalizationBlocked(blocked_message(name, problems))
    if live_namespace is not None and not ours:
        notes.append(f"left namespace {namespace} alone: it was not created for tenant {name}")
    elif ours and delete:
        if silo:
            await _delete_silo(kube, name, namespace)
            notes.append("deleted the silo StatefulSet and its volumes")
        await kube.delete(Namespace, namespace)
        notes.append(f"deleted namespace {namespace}")
    elif ours:
        notes.append(await api_keys.wipe_api_keys(kube, name, namespace))
        await _orphan_namespace(kube, namespace)
        kept = f"kept namespace {namespace}"
        if silo:
            kept += " with the silo StatefulSet, its Secrets and volumes"
        notes.append(kept)
    if delete:
        await _delete_credential_backups(kube, settings, name)
    done.summary = (("deleted: " if delete else "retained: ")
                    + "; ".join(notes or ["nothing provisioned"]))
    return done
