"""kopf handlers of the dedicated endpoint Secret watch (the logic: endpoint_secrets.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import kopf

from .endpoint_secrets import (
    LABEL,
    data_digest,
    missing_secrets,
    reconcile_for_secret,
    referenced_secret,
    release,
    seen_secrets,
    wait_for_secret,
)
from .kube import Kube, Tenant, as_dict
from .names import namespace_name
from .settings import get_settings


@kopf.on.startup()
async def watch_only_labelled_secrets(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Server-side: the watch lists and streams only the Secrets this module labelled.
    settings.watching.label_selectors["v1", "secrets"] = LABEL


@kopf.on.cleanup()
async def stop_waiting(**_: Any) -> None:
    for task in list(missing_secrets.values()):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@kopf.on.event("v1", "secrets", labels={LABEL: kopf.PRESENT})
async def endpoint_secret_event(type: str, name: str, namespace: str | None,
                                labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo,
                                **_: Any) -> None:
    tenant = labels.get(LABEL, "")
    if namespace is None:
        return
    key = (namespace, name)
    if namespace != namespace_name(tenant, get_settings().namespace_prefix):
        return  # not a label of ours: a tenant's Secrets are in its own namespace
    kube: Kube = memo["kube"]
    if type == "DELETED":
        seen_secrets.pop(key, None)
        if (await reconcile_for_secret(kube, tenant, name, "deleted")
                and key not in missing_secrets):
            missing_secrets[key] = asyncio.create_task(
                wait_for_secret(kube, namespace, tenant, name))
        return
    digest, previous = data_digest(body), seen_secrets.get(key)
    seen_secrets[key] = digest
    if not type:  # None: listed at startup: the tenant's own resume reconciles it
        live = await kube.get(Tenant, tenant)
        if live is None or referenced_secret(as_dict(live)) != name:
            await release(kube, namespace, name)
        return
    if previous == digest:
        return  # labels or annotations only (our own label among them)
    if not await reconcile_for_secret(kube, tenant, name, "changed"):
        await release(kube, namespace, name)
