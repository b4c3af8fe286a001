"""Tenant API keys and the runtime's copy of a tenant (docs/api-keys.md).

`ensure_api_keys` keeps one generated key per name of spec.apiKeys in the tenant's Secret
`tenantry-api-keys` (the only place a key is written); `ensure_runtime_record` writes what the
runtime serves the tenant from (config, key hashes, endpoint key, login DSN) into one Secret in
the runtime's namespace (contracts/runtime_record.py).
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime
from typing import Any

from lightkube.resources.core_v1 import Secret
from tenantry_runtime.api_keys import generate_key, record_for
from tenantry_runtime.contracts import runtime_record

from . import builders, dataplane, endpoint_secrets
from .conditions import Condition
from .kube import ForeignObject, Kube, labels_of
from .names import owned_by
from .settings import OperatorSettings
from .steps import StepContext, StepFailed

log = logging.getLogger(__name__)


async def live_secret(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    return await kube.read(Secret, name, namespace)


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's data as text; an entry that is not base64 UTF-8 text reads as empty."""
    found: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            found[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            found[key] = ""
    return found


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


async def ensure_api_keys(ctx: StepContext) -> Condition:
    """Generate a key for each new name; never replace one whose plaintext entry exists."""
    ns, tenant = ctx.namespace, ctx.spec.name
    live = await ctx.live(Secret, builders.API_KEYS_SECRET)
    if live is not None and not owned_by(labels_of(live), tenant):
        # Never read (or hand out) keys from a Secret someone else made.
        raise ForeignObject("Secret", builders.API_KEYS_SECRET, ns, tenant)
    keys, issued = builders.issue_api_keys([k.name for k in ctx.spec.api_keys],
                                           decoded(live) if live else {},
                                           lambda: generate_key()[0])
    manifest = builders.api_keys_secret(tenant, ns, keys)
    if builders.secret_differs(live, manifest):
        await ctx.kube.apply(manifest, live=live)
    for name in issued:  # the name only: a key is never logged
        log.info("tenant %s: key %r issued into Secret %s/%s", tenant, name, ns,
                 builders.API_KEYS_SECRET)
    ctx.api_keys = tuple(record_for(keys[k.name], k.name, _aware(k.expires_at))
                         for k in ctx.spec.api_keys)
    # The same message whether or not a key was new this time: a settled tenant's status
    # stays as it is (the log says which key was issued).
    return Condition("ApiKeysReady", True, "Issued",
                     f"{len(keys)} key(s) in Secret {ns}/{builders.API_KEYS_SECRET}")


async def ensure_runtime_record(ctx: StepContext) -> Condition:
    """The runtime's copy of the tenant, written only when its content changed."""
    ns, tenant, runtime_ns = ctx.namespace, ctx.spec.name, ctx.settings.runtime_namespace
    config, _ = await dataplane.settled_config(ctx)
    endpoint_key: str | None = None
    problem: str | None = None
    ref = ctx.spec.ai.endpoint.secret_ref
    secret: dict[str, Any] | None = None
    if config.endpoint.type == "dedicated" and ref is not None:
        secret = await live_secret(ctx.kube, ns, ref.name)
        endpoint_key = (decoded(secret).get(ref.key) if secret is not None else None) or None
        if endpoint_key is None:
            missing = (f"has no key {ref.key!r}" if secret is not None else
                       f"does not exist; create it with the endpoint's API key under {ref.key!r}")
            problem = (f"Secret {ns}/{ref.name} (spec.ai.endpoint.secretRef) {missing}; the"
                       " runtime answers the tenant's requests with 503 until it has one (it"
                       " never falls back to the shared endpoint)")
    await endpoint_secrets.label_reference(ctx.kube, ns, tenant, secret)
    dsn: str | None = None
    if config.database.credentials_secret:
        credentials = await live_secret(ctx.kube, ns, config.database.credentials_secret)
        fields = decoded(credentials) if credentials else {}
        if all(fields.get(f) for f in ("host", "username", "password", "database")):
            dsn = builders.login_dsn(fields)
    record = builders.tenant_record(ctx.spec, config, ctx.api_keys, endpoint_key, dsn)
    name = runtime_record.secret_name(tenant)
    live = await live_secret(ctx.kube, runtime_ns, name)
    issued = builders.key_issue_times(live, record.api_keys,
                                      datetime.now(UTC).isoformat(timespec="seconds"))
    manifest = builders.runtime_record_secret(tenant, runtime_ns,
                                              runtime_record.record_json(record), issued)
    if builders.secret_differs(live, manifest):
        if live is None:
            await dataplane.ensure_own_namespace(ctx.kube, runtime_ns)
        await ctx.kube.apply(manifest, live=live)
    if problem is not None:
        raise StepFailed(Condition("RuntimeRecordReady", False, "EndpointKeyMissing", problem),
                         retry_after=15)
    return Condition("RuntimeRecordReady", True, "Applied",
                     f"Secret {runtime_ns}/{name}, revision {config.revision},"
                     f" {len(record.api_keys)} key(s)")


async def forget_tenant(kube: Kube, settings: OperatorSettings, tenant: str) -> str:
    """Deletion: the runtime's copy goes (the runtime stops serving the tenant at once)."""
    name = runtime_record.secret_name(tenant)
    live = await live_secret(kube, settings.runtime_namespace, name)
    if live is None or not owned_by(labels_of(live), tenant):
        return "no runtime copy to remove"
    await kube.delete(Secret, name, settings.runtime_namespace)
    return f"removed the runtime's copy {settings.runtime_namespace}/{name}"


async def wipe_api_keys(kube: Kube, tenant: str, namespace: str) -> str:
    """Retain keeps the namespace: its revoked keys are wiped, so a Tenant created again under
    this name gets new keys instead of reviving the old ones."""
    live = await live_secret(kube, namespace, builders.API_KEYS_SECRET)
    if live is None or not owned_by(labels_of(live), tenant) or not live.get("data"):
        return "no API keys to wipe"
    await kube.apply(builders.api_keys_secret(tenant, namespace, {}))
    return f"wiped the revoked API keys in {namespace}/{builders.API_KEYS_SECRET}"
