"""The tenant store: each tenant's runtime config and key records, and where they come from.

A source hands the store whole tenant records; the store keeps the newest revision per
tenant, ignores stale ones and refuses invalid ones (log line + counter) while the last good
record stays in force. The directory source serves tests and the demo; the Kubernetes
ConfigMap/Secret watch will be another source feeding the same `apply`/`remove`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .api_keys import ApiKeyRecord, key_matches, prefix_of
from .contracts.database import InvalidTenantId, validate_tenant_id
from .contracts.runtime_config import TenantRuntimeConfig

log = logging.getLogger(__name__)


class TenantRecord(BaseModel):
    """One tenant as the runtime serves it: config, key hashes, dedicated endpoint key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: TenantRuntimeConfig
    api_keys: tuple[ApiKeyRecord, ...] = ()
    # The dedicated endpoint's key, copied by the operator from the tenant's Secret.
    endpoint_api_key: SecretStr | None = None
    # Bridge/silo tenants: libpq DSN of the tenant's own login (its database or schema), built
    # by the operator from its credentials Secret; used for RAG, conversations and usage rows
    # where its data lives. Pool tenants use the runtime's shared `database_url`.
    database_dsn: SecretStr | None = None
    # Redis unreachable: admit on the per-replica rate-limit share without a budget check
    # (True) or refuse with 503 (False, the default: budgets fail closed).
    budget_fail_open: bool = False
    # Under saturation higher tiers are admitted first (e.g. free 0, pro 1, enterprise 2).
    plan_tier: int = Field(0, ge=0, le=100)
    # The plan's cap on this tenant's requests in flight per replica (None: the runtime's
    # `max_concurrent_per_tenant`).
    max_concurrent_requests: int | None = Field(None, ge=1)


class Outcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    STALE = "stale"
    REFUSED = "refused"


@dataclass(frozen=True)
class Caller:
    """An authenticated request's tenant and key name."""

    record: TenantRecord
    key_name: str

    @property
    def config(self) -> TenantRuntimeConfig:
        return self.record.config


@dataclass
class TenantStore:
    _tenants: dict[str, TenantRecord] = field(default_factory=dict)
    # prefix -> (record, key): one lookup, replaced whole, so readers never see half an update.
    _by_prefix: dict[str, tuple[TenantRecord, ApiKeyRecord]] = field(default_factory=dict)
    # Refusals by reason, for /metrics later (`tenantry_runtime_config_refused_total`).
    refused: Counter[str] = field(default_factory=Counter)
    stale_ignored: int = 0
    loaded: bool = False

    def get(self, tenant: str) -> TenantRecord | None:
        return self._tenants.get(tenant)

    def tenants(self) -> list[str]:
        return sorted(self._tenants)

    def apply(self, record: TenantRecord) -> Outcome:
        """Keep `record` unless a newer revision is held; keys follow the kept record."""
        tenant = record.config.tenant
        try:
            validate_tenant_id(tenant)
        except InvalidTenantId as error:
            return self.refuse(repr(tenant), "invalid_tenant_id", str(error))
        current = self._tenants.get(tenant)
        if current is not None and record.config.revision < current.config.revision:
            log.info("tenant %s: ignoring stale revision %d (holding %d)", tenant,
                     record.config.revision, current.config.revision)
            self.stale_ignored += 1
            return Outcome.STALE
        if current == record:
            return Outcome.UNCHANGED
        prefixes = [k.prefix for k in record.api_keys]
        taken = [p for p in prefixes if p in self._by_prefix
                 and self._by_prefix[p][0].config.tenant != tenant]
        if taken or len(set(prefixes)) != len(prefixes):
            # A prefix held twice would make lookups ambiguous: refuse the whole record.
            return self.refuse(tenant, "key_prefix_conflict", f"key prefixes in use: {taken}")
        self._tenants[tenant] = record
        self._index()
        return Outcome.APPLIED

    def remove(self, tenant: str) -> bool:
        removed = self._tenants.pop(tenant, None) is not None
        if removed:
            self._index()
        return removed

    def authenticate(self, key: str, now: datetime | None = None) -> Caller | None:
        """The tenant owning `key`, if the key is known, matches its hash and has not expired."""
        prefix = prefix_of(key)
        if prefix is None:
            return None
        found = self._by_prefix.get(prefix)
        if found is None:
            return None
        tenant_record, key_record = found
        if not key_matches(key, key_record, now):
            return None
        return Caller(tenant_record, key_record.name)

    def refuse(self, source: str, reason: str, detail: str) -> Outcome:
        """Count and log a record that cannot be used; the last good one stays."""
        self.refused[reason] += 1
        log.error("tenant config %s refused (%s): %s; keeping the last good one",
                  source, reason, detail)
        return Outcome.REFUSED

    def _index(self) -> None:
        self._by_prefix = {key.prefix: (record, key) for record in self._tenants.values()
                           for key in record.api_keys}


def parse_record(raw: bytes) -> TenantRecord:
    """Pure: a tenant file's bytes as a record (raises ValidationError)."""
    return TenantRecord.model_validate_json(raw)


@dataclass
class DirectorySource:
    """Tenant records from `<dir>/<tenant>.json`; a deleted file removes the tenant."""

    directory: Path
    store: TenantStore
    _seen: dict[str, tuple[int, int]] = field(default_factory=dict)

    def sync(self) -> None:
        """Read the directory and apply what changed (call from the event loop's thread)."""
        self.apply(self.read())

    def read(self) -> list[tuple[str, Path, bytes | None]]:
        """I/O only: (tenant, path, bytes or None when unchanged) for each file."""
        found: list[tuple[str, Path, bytes | None]] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                stat = path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                raw = None if self._seen.get(path.stem) == stamp else path.read_bytes()
            except FileNotFoundError:
                continue
            self._seen[path.stem] = stamp
            found.append((path.stem, path, raw))
        present = {tenant for tenant, _, _ in found}
        self._seen = {t: stamp for t, stamp in self._seen.items() if t in present}
        return found

    def apply(self, files: list[tuple[str, Path, bytes | None]]) -> None:
        present: set[str] = set()
        for tenant, path, raw in files:
            present.add(tenant)
            if raw is None:
                continue
            try:
                record = parse_record(raw)
            except (ValidationError, ValueError) as error:
                self.store.refuse(str(path), "invalid", str(error).splitlines()[0])
                continue
            if record.config.tenant != tenant:
                self.store.refuse(str(path), "name_mismatch",
                                  f"file names {tenant}, config names {record.config.tenant}")
                continue
            self.store.apply(record)
        for tenant in set(self.store.tenants()) - present:
            self.store.remove(tenant)
            log.info("tenant %s removed: its file is gone", tenant)
        self.store.loaded = True

    async def watch(self, interval: float) -> None:
        while True:
            try:
                self.apply(await asyncio.to_thread(self.read))
            except OSError:
                log.exception("reading %s failed; keeping the current tenants", self.directory)
            await asyncio.sleep(interval)
