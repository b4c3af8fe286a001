"""Dedicated endpoint Secrets reach the runtime within seconds of a change.

A dedicated tenant's model key lives in a Secret its users create in the tenant's namespace
(`spec.ai.endpoint.secretRef`); the operator copies it into the runtime's record. To learn of
a change without watching (and holding) every Secret of the cluster, the operator labels the
referenced Secret `tenantry.dev/endpoint-secret-of=<tenant>` and kopf watches only Secrets
with that label (a server-side label selector):

- The label is a server-side apply of that one label under its own field manager
  (`tenantry-operator-endpoint-label`), with the Secret's uid as a precondition, so it never
  creates a Secret nor labels a replacement, and Argo CD (or whoever applies the Secret) owns
  its other fields and keeps them; an apply of no labels by that manager removes the label
  when the Tenant stops referring to the Secret.
- A change of the Secret's data, or its deletion, re-reconciles the tenant at once: its runtime
  record gets the new key (or none: `EndpointKeyMissing`, the runtime answers 503 and never
  falls back to the shared endpoint), and the Tenant gets an `EndpointSecretChanged` Event.
- A deleted Secret is looked for every `POLL_SECONDS` until it is back (one GET per missing
  Secret, nothing for the others): a re-created Secret carries no label yet.

The map from a labelled Secret to its tenant is the label itself (and the namespace must be
that tenant's). Not a kopf index: kopf holds every handler until each index is filled.
The kopf handlers are in `endpoint_secret_watch.py` (registered by handlers.py): this module
is imported by the runtime-record step, and importing kopf handlers creates kopf's registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf
from lightkube import codecs
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Secret

from .kube import Kube, Tenant, as_dict
from .model import GROUP, TenantSpec
from .settings import get_settings

log = logging.getLogger(__name__)

LABEL = f"{GROUP}/endpoint-secret-of"
LABEL_FIELD_MANAGER = "tenantry-operator-endpoint-label"
POLL_SECONDS = 2.0

# (namespace, Secret name) -> digest of its data, for every labelled Secret the watch has seen:
# a label-only change (ours) re-reconciles nothing. In memory: rebuilt by the watch's listing.
seen_secrets: dict[tuple[str, str], str] = {}
# Deleted Secrets still referenced, looked for until they are back.
missing_secrets: dict[tuple[str, str], asyncio.Task[None]] = {}


def data_digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body.get("data") or {}, sort_keys=True).encode()).hexdigest()


def referenced_secret(tenant: Mapping[str, Any]) -> str | None:
    """The endpoint Secret a live Tenant reads, or None (shared endpoint, deleting)."""
    if (tenant.get("metadata") or {}).get("deletionTimestamp"):
        return None
    endpoint = TenantSpec.from_body(tenant.get("spec") or {}).ai.endpoint
    if endpoint.type != "dedicated" or endpoint.secret_ref is None:
        return None
    return endpoint.secret_ref.name


async def set_label(kube: Kube, namespace: str, name: str, uid: str, tenant: str | None) -> None:
    """Apply only our label (None: remove it); the uid makes it a no-op on a missing Secret."""
    manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": name, "namespace": namespace, "uid": uid,
        "labels": {LABEL: tenant} if tenant is not None else {}}}
    try:
        await kube.client.apply(codecs.from_dict(manifest), field_manager=LABEL_FIELD_MANAGER,
                                force=True)
    except ApiError as err:
        # 404/409: gone; 422: replaced by another object with that name (its own label later).
        if err.status.code not in (404, 409, 422):
            raise


async def label_reference(kube: Kube, namespace: str, tenant: str,
                          secret: Mapping[str, Any] | None) -> None:
    """Called by the runtime-record step with the endpoint Secret it read (None: none).

    Labels it once; removes the label from a Secret of this tenant it no longer refers to.
    A settled tenant makes no request.
    """
    current = None
    if secret is not None:
        meta = secret.get("metadata") or {}
        current = meta.get("name")
        if (meta.get("labels") or {}).get(LABEL) != tenant:
            seen_secrets[(namespace, meta["name"])] = data_digest(secret)  # its ADDED is no change
            await set_label(kube, namespace, meta["name"], meta["uid"], tenant)
            log.info("tenant %s: endpoint Secret %s/%s labelled %s (watched for changes)",
                     tenant, namespace, meta["name"], LABEL)
    for ns, name in list(seen_secrets):
        if ns == namespace and name != current:
            await release(kube, namespace, name)


async def release(kube: Kube, namespace: str, name: str) -> None:
    live = await kube.get(Secret, name, namespace)
    seen_secrets.pop((namespace, name), None)
    if live is not None and (live.metadata.labels or {}).get(LABEL):
        await set_label(kube, namespace, name, live.metadata.uid, None)
        log.info("endpoint Secret %s/%s no longer referred to: label %s removed", namespace,
                 name, LABEL)


async def reconcile_for_secret(kube: Kube, tenant: str, name: str, what: str) -> bool:
    """Re-reconcile `tenant` when it still reads Secret `name`; False when it does not."""
    # Imported here: handlers imports this module to register its handlers.
    from .handlers import post_events
    from .pipeline import reconcile_steps
    from .reconcile import reconcile_tenant

    live = await kube.get(Tenant, tenant)
    if live is None:
        return False
    body = kopf.Body(cast(kopf.RawBody, as_dict(live)))
    if referenced_secret(body) != name:
        return False
    settled = await reconcile_tenant(body, kube, get_settings(), reconcile_steps())
    if settled.status_patch:
        await kube.patch_tenant_status(tenant, settled.status_patch)
    post_events(body, settled)
    kopf.info(body, reason="EndpointSecretChanged",
              message=f"endpoint Secret {name} {what}: runtime record reconciled, phase"
                      f" {settled.outcome.status['phase']}")
    return True


async def wait_for_secret(kube: Kube, namespace: str, tenant: str, name: str) -> None:
    """A deleted, still referenced Secret: reconcile as soon as it exists again."""
    try:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            live = await kube.get(Tenant, tenant)
            if live is None or referenced_secret(as_dict(live)) != name:
                return
            if await kube.get(Secret, name, namespace) is not None:
                await reconcile_for_secret(kube, tenant, name, "created again")
                return
    except Exception:  # the tenant's resync is the safety net
        log.exception("waiting for endpoint Secret %s/%s failed", namespace, name)
    finally:
        missing_secrets.pop((namespace, name), None)
