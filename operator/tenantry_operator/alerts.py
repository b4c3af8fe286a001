"""Delivery of budget alerts: an Event on the Tenant, the BudgetAlert condition, the webhook.

The runtime claims each alert once per period and records it in the tenant's `alerts` stream
(tenantry_runtime.alerts). The operator's leader reads the streams through a consumer group
and, per alert: creates an Event whose name derives from the alert id (a second attempt gets
409 and changes nothing), POSTs the signed webhook when the Tenant asks for one, and only then
acknowledges the entry. A failed delivery stays pending and is retried next round, until
`alerts_webhook_give_up_seconds` after the alert (then a Warning Event says so). Receivers
deduplicate on the Tenantry-Alert-Id header: a crash between the POST and the acknowledgement
sends once more. The condition is level-based: recomputed every round from the current
periods' claims, so it clears when a new day or month begins.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import weakref
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
from lightkube import ApiError, codecs
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from tenantry_runtime.alerts import (
    ALERT_ID_HEADER,
    BUDGETS,
    SIGNATURE_HEADER,
    THRESHOLDS,
    BudgetAlert,
    sign,
)
from tenantry_runtime.contracts.redis_keys import TenantKeys

from .conditions import Condition, merge_conditions
from .kube import Kube, Tenant, as_dict
from .model import GROUP, VERSION
from .names import MANAGER, namespace_name
from .settings import OperatorSettings

log = logging.getLogger(__name__)

GROUP_NAME = "operator-alerts"
# One consumer name for every replica: a new leader reads the pending entries of the last.
CONSUMER = "operator"
CONDITION = "BudgetAlert"
# Events about a cluster-scoped object live in `default` (as kopf posts them).
EVENTS_NAMESPACE = "default"
WEBHOOK_SECRET_KEY = "hmac-key"  # noqa: S105 - the data key's name, not a secret
Entry = tuple[bytes, dict[bytes, bytes]]
# Tenants whose Redis state a round reads in one pipeline (one round trip per batch instead
# of three per tenant every round: bench/README.md, operator_scale).
ROUND_BATCH = 100


class WebhookFailed(RuntimeError):
    """The alert could not be delivered now; it stays pending."""


# The BudgetAlert race (docs/architecture.md). A reconcile's status patch carries
# the whole conditions list (a JSON merge patch replaces a list), BudgetAlert included, from a
# body that may predate this loop's last write. So, per event loop (both run in the leader's),
# by Tenant uid:
# - the BudgetAlert this loop last wrote or found in place: the reconcile carries that one
#   (`latest_budget_alert`), never an older one from its body;
# - whether a reconcile handed a conditions patch over since this loop last looked
#   (`reconcile_patched`): kopf sends it after the handler returns, so it may not have landed
#   yet; this loop then writes one round later, when it has.
_written: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary())
_patched: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[str]] = (
    weakref.WeakKeyDictionary())


def _written_conditions() -> dict[str, dict[str, Any]]:
    return _written.setdefault(asyncio.get_running_loop(), {})


def _patched_tenants() -> set[str]:
    return _patched.setdefault(asyncio.get_running_loop(), set())


def latest_budget_alert(uid: str) -> list[dict[str, Any]]:
    """The BudgetAlert condition this loop last wrote or confirmed for the Tenant (none yet:
    empty)."""
    found = _written_conditions().get(uid)
    return [dict(found)] if found is not None else []


def reconcile_patched(uid: str, status_patch: Mapping[str, Any]) -> None:
    """A reconcile (under the tenant's lock) hands `status_patch` over to be sent."""
    if "conditions" in status_patch:
        _patched_tenants().add(uid)


def forget_budget_alert(uid: str) -> None:
    _written_conditions().pop(uid, None)
    _patched_tenants().discard(uid)


def alert_condition(claimed: Sequence[tuple[str, int]]) -> Condition:
    """Pure: the BudgetAlert condition from the (budget, threshold) pairs of this period."""
    if not claimed:
        return Condition(CONDITION, False, "WithinBudgets",
                         "under 80% of every budget and allowance this period")
    reached = {budget: max(t for b, t in claimed if b == budget)
               for budget in BUDGETS if any(b == budget for b, _ in claimed)}
    worst_budget, worst = max(reached.items(), key=lambda item: item[1])
    message = "; ".join(f"{budget} {threshold}%" for budget, threshold in reached.items())
    return Condition(CONDITION, True, f"{worst_budget.capitalize()}{worst}Percent",
                     f"reached this period: {message}")


def event_manifest(alert: BudgetAlert, uid: str | None, reason: str = "BudgetAlert",
                   message: str | None = None) -> dict[str, Any]:
    """Pure: the Event about `alert`; its name is a function of the alert id and reason."""
    digest = hashlib.sha256(f"{reason}/{alert.id}".encode()).hexdigest()[:20]
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Tenant", "name": alert.tenant}
    if uid:
        involved["uid"] = uid
    warning = alert.threshold >= 100 or reason != "BudgetAlert"
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{alert.tenant}.{digest}", "namespace": EVENTS_NAMESPACE},
        "involvedObject": involved, "reason": reason,
        "message": message or alert.describe(), "type": "Warning" if warning else "Normal",
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        "source": {"component": MANAGER}, "reportingComponent": MANAGER,
    }


def webhook_spec(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    webhook = ((body.get("spec") or {}).get("alerts") or {}).get("webhook")
    return cast(Mapping[str, Any], webhook) if webhook else None


async def public_address_only(url: str) -> None:
    """Refuse a URL whose host resolves to a private, loopback or link-local address: the
    operator runs inside the cluster, and a tenant's URL must not reach its services."""
    host = urlsplit(url).hostname
    if not host:
        raise WebhookFailed(f"webhook URL {url!r} has no host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    except OSError as error:
        raise WebhookFailed(f"webhook host {host!r} does not resolve: {error}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise WebhookFailed(f"webhook host {host!r} resolves to the non-public address "
                                f"{address}; refused (alerts_webhook_allow_private)")


class AlertDispatcher:
    def __init__(self, kube: Kube, redis: Redis, settings: OperatorSettings,
                 http: aiohttp.ClientSession) -> None:
        self.kube = kube
        self.redis = redis
        self.settings = settings
        self.http = http
        self._groups: set[str] = set()

    async def run(self) -> None:
        """For the operator's lifetime; a failed round is logged and retried next round."""
        while True:
            try:
                await self.run_round()
            except Exception:
                log.exception("delivering budget alerts failed; retrying next round")
            await asyncio.sleep(self.settings.alerts_interval_seconds)

    async def run_round(self) -> int:
        """Deliver every recorded alert of every Tenant; returns alerts delivered."""
        delivered = 0
        batch: list[dict[str, Any]] = []
        async for tenant in self.kube.client.list(Tenant):
            body = as_dict(tenant)
            if body["metadata"].get("deletionTimestamp"):
                continue
            batch.append(body)
            if len(batch) == ROUND_BATCH:
                delivered += await self.run_batch(batch)
                batch = []
        return delivered + (await self.run_batch(batch) if batch else 0)

    async def run_batch(self, bodies: Sequence[dict[str, Any]]) -> int:
        """One pipeline reads whether each tenant has an alert stream and its claims of this
        period; only tenants with a stream are read further."""
        now = datetime.now(UTC)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for body in bodies:
                    keys = TenantKeys(body["metadata"]["name"])
                    pipe.exists(keys.alerts)
                    for key in (keys.alert_claims_day(now), keys.alert_claims_month(now)):
                        pipe.hkeys(key)
                replies = await pipe.execute()
        except (RedisError, OSError):
            log.exception("alerts of %d tenant(s): retrying next round", len(bodies))
            return 0
        delivered = 0
        for index, body in enumerate(bodies):
            has_stream, *claims = replies[3 * index:3 * index + 3]
            try:
                if has_stream:
                    delivered += await self.dispatch(body)
                else:  # no stream, no alert (nor a group to create for it)
                    self._groups.discard(TenantKeys(body["metadata"]["name"]).alerts)
                await self.update_condition(body, claimed(claims))
            except (RedisError, ApiError, aiohttp.ClientError, OSError):
                log.exception("alerts of tenant %s: retrying next round",
                              body["metadata"]["name"])
        return delivered

    async def _entries(self, stream: str) -> list[Entry]:
        # No stream, no alert: nothing is created for tenants that never reached a threshold
        # (nor recreated for one whose keys the finalizer just deleted).
        if not await self.redis.exists(stream):
            self._groups.discard(stream)
            return []
        if stream not in self._groups:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(stream, GROUP_NAME, id="0")
            self._groups.add(stream)
        entries: dict[bytes, dict[bytes, bytes]] = {}
        # Pending ones (a failed delivery, a crashed leader), then new ones. XREADGROUP of the
        # pending history counts as a write in Redis even when it returns nothing, so it runs
        # only when XPENDING (a read) says there are some: a settled round writes nothing.
        pending = int((await self.redis.xpending(stream, GROUP_NAME))["pending"])
        for start in ("0", ">") if pending else (">",):
            read = cast(list[tuple[bytes, list[Entry]]], await self.redis.xreadgroup(
                GROUP_NAME, CONSUMER, {stream: start}, count=100) or [])
            for _, found in read:
                entries.update(found)
        return list(entries.items())

    async def dispatch(self, body: Mapping[str, Any]) -> int:
        tenant = body["metadata"]["name"]
        stream = TenantKeys(tenant).alerts
        delivered = 0
        for entry_id, fields in await self._entries(stream):
            try:
                alert = BudgetAlert.from_stream(tenant, fields)
            except (KeyError, ValueError):
                log.error("malformed alert %s of %s dropped: %r", entry_id, tenant, fields)
                await self.redis.xack(stream, GROUP_NAME, entry_id)
                continue
            if await self.deliver(body, alert):
                await self.redis.xack(stream, GROUP_NAME, entry_id)
                delivered += 1
        return delivered

    async def deliver(self, body: Mapping[str, Any], alert: BudgetAlert) -> bool:
        """True when done with `alert` (delivered, or given up on)."""
        uid = body["metadata"].get("uid")
        await self._post_event(event_manifest(alert, uid))
        webhook = webhook_spec(body)
        if webhook is None:
            return True
        try:
            await self._send_webhook(body, webhook, alert)
            return True
        except WebhookFailed as error:
            age = datetime.now(UTC) - datetime.fromisoformat(alert.at.replace("Z", "+00:00"))
            if age.total_seconds() < self.settings.alerts_webhook_give_up_seconds:
                log.warning("alert %s not delivered yet: %s", alert.id, error)
                return False
            await self._post_event(event_manifest(
                alert, uid, "BudgetAlertUndelivered",
                f"webhook for {alert.describe()} given up: {error}"))
            return True

    async def _post_event(self, manifest: dict[str, Any]) -> None:
        try:
            await self.kube.client.create(codecs.from_dict(manifest))
        except ApiError as error:
            if error.status.code != 409:  # 409: this alert's Event is there already
                raise

    async def _secret(self, body: Mapping[str, Any], webhook: Mapping[str, Any]) -> bytes:
        ref = webhook.get("secretRef") or {}
        namespace = ((body.get("status") or {}).get("provisioned") or {}).get("namespace") \
            or namespace_name(body["metadata"]["name"], self.settings.namespace_prefix)
        name, key = ref.get("name", ""), ref.get("key") or WEBHOOK_SECRET_KEY
        secret = await self.kube.get(Secret, name, namespace)
        value = (secret.data or {}).get(key) if secret is not None else None
        if not value:
            raise WebhookFailed(f"Secret {namespace}/{name} with key {key!r} not found")
        return base64.b64decode(value)

    async def _send_webhook(self, body: Mapping[str, Any], webhook: Mapping[str, Any],
                            alert: BudgetAlert) -> None:
        url = str(webhook.get("url", ""))
        if not self.settings.alerts_webhook_allow_private:
            await public_address_only(url)
        payload = alert.body()
        headers = {"content-type": "application/json", "user-agent": "tenantry-alerts/1",
                   SIGNATURE_HEADER: sign(await self._secret(body, webhook), payload),
                   ALERT_ID_HEADER: alert.id}
        timeout = aiohttp.ClientTimeout(total=self.settings.alerts_webhook_timeout_seconds)
        try:
            async with self.http.post(url, data=payload, headers=headers, timeout=timeout,
                                      allow_redirects=False) as response:
                if response.status >= 300:
                    raise WebhookFailed(f"{url} answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise WebhookFailed(f"{url}: {type(error).__name__} {error}") from None

    async def update_condition(self, body: Mapping[str, Any],
                               claims: Sequence[tuple[str, int]]) -> bool:
        """Patch the BudgetAlert condition when it differs from what the claims say; True when
        patched. Never while a reconcile of the Tenant may still write an older one: one that
        is computing now (its lock is held), or whose patch was handed over since the last
        round (it may be in flight): the condition is recorded for the reconciles to carry,
        and written next round."""
        tenant = body["metadata"]["name"]
        uid = str(body["metadata"].get("uid", ""))
        reconciled = uid in _patched_tenants()
        _patched_tenants().discard(uid)
        wanted = alert_condition(claims)
        if _holds(body, wanted):
            _written_conditions()[uid] = _condition_of(body, wanted.type)
            return False
        if not wanted.ok and not (body.get("status") or {}).get("conditions"):
            # Not reconciled yet and nothing claimed: its first status carries this condition
            # (reconcile.budget_condition); a patch now would only race kopf's first patches of
            # the new Tenant (its finalizer's, refused with 422, then redone).
            return False
        # Recorded before anything is sent (no await in between): a reconcile that takes the
        # lock from now on carries it.
        self._record(body, wanted)
        # Imported here: reconcile imports this module.
        from .reconcile import tenant_lock
        if reconciled or tenant_lock(tenant).locked():
            log.info("BudgetAlert condition of %s: after the reconcile's patch, next round",
                     tenant)
            return False
        # The list is replaced whole: patch a fresh copy, on the condition that nobody changed
        # the Tenant since (resourceVersion), so a reconcile's newer conditions are never
        # overwritten with older ones. A conflict is retried next round.
        fresh = await self.kube.get(Tenant, tenant)
        if fresh is None:
            return False
        body = as_dict(fresh)
        if _holds(body, wanted):
            return False
        merged = self._record(body, wanted)
        try:
            await self.kube.client.patch(
                Tenant.Status, tenant,
                {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                 "status": {"conditions": merged}}, patch_type=PatchType.MERGE)
        except ApiError as error:
            if error.status.code != 409:
                raise
            log.info("BudgetAlert condition of %s: the Tenant changed, next round", tenant)
            return False
        return True

    @staticmethod
    def _record(body: Mapping[str, Any], wanted: Condition) -> list[dict[str, Any]]:
        """The Tenant's conditions with `wanted`; its BudgetAlert remembered for reconciles."""
        uid = str(body["metadata"].get("uid", ""))
        current = list((body.get("status") or {}).get("conditions") or [])
        # A change recorded in an earlier round and not written yet keeps that round's time.
        earlier = _written_conditions().get(uid) or {}
        since = earlier.get("lastTransitionTime") if earlier.get("status") == wanted.status \
            else None
        merged = merge_conditions(current, [wanted], int(body["metadata"].get("generation", 0)),
                                  since)
        _written_conditions()[uid] = next(c for c in merged if c["type"] == wanted.type)
        return merged


def claimed(replies: Sequence[Sequence[bytes | str]]) -> list[tuple[str, int]]:
    """Pure: the (budget, threshold) pairs in the fields of the period's claim hashes."""
    claims: list[tuple[str, int]] = []
    for fields in replies:
        for field in fields:
            text = field.decode() if isinstance(field, bytes) else str(field)
            budget, threshold = text.split(":")
            if budget in BUDGETS and int(threshold) in THRESHOLDS:
                claims.append((budget, int(threshold)))
    return claims


def _condition_of(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    conditions = (body.get("status") or {}).get("conditions") or []
    return dict(next(c for c in conditions if c.get("type") == kind))


def _holds(body: Mapping[str, Any], wanted: Condition) -> bool:
    """Whether the Tenant's status already carries `wanted`, observed at its generation (a spec
    change moves every other condition's observedGeneration; this one follows)."""
    conditions = (body.get("status") or {}).get("conditions") or []
    old = next((c for c in conditions if c.get("type") == wanted.type), None)
    generation = int(body["metadata"].get("generation", 0))
    return old is not None and (old.get("status"), old.get("reason"), old.get("message"),
                                old.get("observedGeneration")) == (
        wanted.status, wanted.reason, wanted.message, generation)


async def deliver_alerts(kube: Kube, settings: OperatorSettings) -> None:
    """The operator's alert loop (handlers.configure starts it on the leader)."""
    if settings.redis_url is None or settings.alerts_interval_seconds <= 0:
        return
    redis = Redis.from_url(settings.redis_url.get_secret_value())
    try:
        async with aiohttp.ClientSession() as http:
            await AlertDispatcher(kube, redis, settings, http).run()
    finally:
        await redis.aclose()
