"""Tenant records from Kubernetes: the Secrets the operator writes into the runtime's namespace.

List, then watch from the list's resourceVersion; on 410 Gone list again at once, on any other
error (API server away, connection lost) list again after a backoff. A listed or watched
Secret is handed to the store (newest revision wins, an invalid one is refused while the last
good record stays); a deleted one removes its tenant, whose keys stop working at once. Only the
runtime's own namespace is read, never cluster-wide (contracts/runtime_record.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Secret
from pydantic import ValidationError

from .contracts import runtime_record
from .store import Outcome, TenantRecord, TenantStore, parse_record

log = logging.getLogger(__name__)

Manifest = Mapping[str, Any]


def secret_tenant(secret: Manifest) -> str | None:
    """The tenant a record Secret is for, from its name (the label must agree)."""
    return runtime_record.tenant_of(str((secret.get("metadata") or {}).get("name", "")))


def record_of(secret: Manifest, tenant: str) -> TenantRecord:
    """Pure: the record a Secret carries; ValueError says why it cannot be used."""
    meta = secret.get("metadata") or {}
    label = (meta.get("labels") or {}).get(runtime_record.LABEL_TENANT)
    if label != tenant:
        raise ValueError(f"label {runtime_record.LABEL_TENANT}={label!r} does not name {tenant}")
    raw = (secret.get("data") or {}).get(runtime_record.DATA_KEY)
    if raw is None:
        raise ValueError(f"no data key {runtime_record.DATA_KEY}")
    try:
        payload = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{runtime_record.DATA_KEY} is not base64: {error}") from None
    try:
        record = parse_record(payload)
    except ValidationError as error:
        raise ValueError(str(error).splitlines()[0]) from None
    if record.config.tenant != tenant:
        raise ValueError(f"the Secret names {tenant}, its config names {record.config.tenant}")
    return record


def kube_client() -> AsyncClient:
    """In-cluster service account, else $KUBECONFIG or ~/.kube/config."""
    return AsyncClient(config=KubeConfig.from_env())


@dataclass
class KubeSource:
    namespace: str
    store: TenantStore
    connect: Callable[[], AsyncClient] = kube_client
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    # A watch is restarted (from a fresh list) after this long: a half-open connection to an
    # API server that vanished would otherwise leave revocations unseen forever.
    watch_seconds: float = 300.0
    # Lists and watch errors, for /metrics later; `relists` counts 410 Gone and reconnects.
    relists: int = 0
    errors: int = 0
    _client: AsyncClient | None = field(default=None, repr=False)

    # --- pure parts: Secrets in, store updates out -------------------------------------------

    def apply_secret(self, secret: Manifest) -> Outcome | None:
        tenant = secret_tenant(secret)
        if tenant is None:
            return None
        try:
            record = record_of(secret, tenant)
        except ValueError as error:
            where = f"Secret {self.namespace}/{secret['metadata']['name']}"
            return self.store.refuse(where, "invalid", str(error))
        outcome = self.store.apply(record)
        if outcome is Outcome.APPLIED:
            log.info("tenant %s: record revision %d applied (%d key(s))", tenant,
                     record.config.revision, len(record.api_keys))
        return outcome

    def remove_secret(self, secret: Manifest) -> None:
        tenant = secret_tenant(secret)
        if tenant is not None and self.store.remove(tenant):
            log.info("tenant %s removed: its runtime record was deleted", tenant)

    def replace_all(self, secrets: Iterable[Manifest]) -> None:
        """A full list: apply every Secret, remove the tenants that have none any more."""
        present: set[str] = set()
        for secret in secrets:
            tenant = secret_tenant(secret)
            if tenant is not None:
                present.add(tenant)
                self.apply_secret(secret)
        for tenant in set(self.store.tenants()) - present:
            self.store.remove(tenant)
            log.info("tenant %s removed: no runtime record in the list", tenant)
        self.store.loaded = True

    def on_event(self, kind: str, secret: Manifest) -> None:
        if kind == "DELETED":
            self.remove_secret(secret)
        elif kind in ("ADDED", "MODIFIED"):
            self.apply_secret(secret)

    # --- I/O ------------------------------------------------------------------------------------

    async def list_once(self) -> str:
        """Apply the full list; its resourceVersion, to watch from."""
        client = self._client_now()
        listing = client.list(Secret, namespace=self.namespace,
                              labels={runtime_record.LABEL_RECORD: runtime_record.RECORD_VERSION})
        secrets = [secret.to_dict() async for secret in listing]
        self.replace_all(secrets)
        return listing.resourceVersion

    async def watch_from(self, version: str) -> None:
        client = self._client_now()
        async for kind, secret in client.watch(
                Secret, namespace=self.namespace, resource_version=version,
                labels={runtime_record.LABEL_RECORD: runtime_record.RECORD_VERSION}):
            self.on_event(kind, secret.to_dict())

    async def run(self) -> None:
        """List and watch until cancelled; never gives up (the last records stay served)."""
        delay = self.backoff_seconds
        try:
            while True:
                try:
                    version = await self.list_once()
                    delay = self.backoff_seconds
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.watch_seconds):
                            await self.watch_from(version)
                    self.relists += 1  # the watch ended or timed out: list again
                except asyncio.CancelledError:
                    raise
                except ApiError as error:
                    self.relists += 1
                    if error.status.code == 410:  # the version is too old: list again now
                        log.info("runtime records: watch expired (410 Gone), listing again")
                        continue
                    delay = await self._back_off(error, delay)
                except Exception as error:
                    delay = await self._back_off(error, delay)
        finally:
            await self._drop_client()

    def _client_now(self) -> AsyncClient:
        if self._client is None:
            self._client = self.connect()
        return self._client

    async def _drop_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def _back_off(self, error: Exception, delay: float) -> float:
        """Log, wait, and connect afresh next time (config and token are read again)."""
        self.errors += 1
        await self._drop_client()
        log.warning("runtime records in namespace %s: %s: %s; keeping the current tenants,"
                    " listing again in %.1fs", self.namespace, type(error).__name__, error, delay)
        await asyncio.sleep(delay)
        return min(delay * 2, self.backoff_max_seconds)
