"""The Redis key scheme shared by the operator (writes limits) and the runtime (enforces them).

Every key of a tenant starts with `tenantry:v1:{<tenant>}:`. The braces are a Redis Cluster
hash tag, so all of a tenant's keys live in one slot and one Lua script can touch them
atomically. Tenant ids are validated DNS labels (lowercase letters, digits, hyphens; no brace,
colon or glob character), so the prefix of one tenant can never be a prefix of another's:
`{acme}:` does not match `{acme2}:` nor `{acme-corp}:`, and `{a-b}:` is not `{ab}:`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from .database import validate_tenant_id

SCHEME_VERSION = "v1"

# The shared document registry (issue 7, the response sanitizer): one hash `document id ->
# tenant` for every tenant, so each runtime replica can tell another tenant's document id in an
# answer (sanitize.py). Outside any tenant's hash tag (a Cluster slot of its own): it is read
# with one HMGET of all the UUIDs an answer holds, whoever owns them. Each tenant's ids are
# also in its own set (`TenantKeys.documents`), so deleting a tenant forgets them without a
# scan of the hash.
DOCUMENT_OWNERS = f"tenantry:{SCHEME_VERSION}:document-owners"

# Keys of a tenant without a time bucket: the runtime's GCRA state, holds and usage stream (named
# in tenantry_runtime.limits), next to the limits hash.
FIXED_SUFFIXES = ("limits", "gcra:req", "gcra:tok", "holds", "holds:amount", "holds:total",
                  "usage")

# Fields of the limits hash; the runtime's Lua script reads exactly these.
LIMIT_FIELDS = (
    "revision",
    "daily_tokens",
    "monthly_tokens",
    "overage_allowed",
    "requests_per_minute",
    "tokens_per_minute",
    "max_tokens_per_request",
    "suspended",
    # Billing alerts (issue 10): the plan's monthly allowance, alerted at 80% and 100%.
    "included_monthly_tokens",
)


@dataclass(frozen=True)
class TenantKeys:
    tenant: str

    def __post_init__(self) -> None:
        validate_tenant_id(self.tenant)

    @property
    def prefix(self) -> str:
        return f"tenantry:{SCHEME_VERSION}:{{{self.tenant}}}:"

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of this tenant and no other tenant's."""
        return self.prefix + "*"

    @property
    def limits(self) -> str:
        return self.prefix + "limits"

    @property
    def documents(self) -> str:
        """The set of the tenant's document ids registered in DOCUMENT_OWNERS. Not in
        `known_keys`: it goes only with the documents (deletionPolicy Delete)."""
        return self.prefix + "documents"

    def tokens_day(self, at: datetime) -> str:
        return self.prefix + at.strftime("tokens:day:%Y%m%d")

    def tokens_month(self, at: datetime) -> str:
        return self.prefix + at.strftime("tokens:month:%Y%m")

    def requests_minute(self, at: datetime) -> str:
        return self.prefix + at.strftime("rate:req:%Y%m%d%H%M")

    def tokens_minute(self, at: datetime) -> str:
        return self.prefix + at.strftime("rate:tok:%Y%m%d%H%M")

    # Budget alerts (issue 10): the runtime records each alert once in `alerts`; the claims
    # of a period say which thresholds have fired.
    @property
    def alerts(self) -> str:
        return self.prefix + "alerts"

    def alert_claims_day(self, at: datetime) -> str:
        return self.prefix + at.strftime("alerts:claimed:day:%Y%m%d")

    def alert_claims_month(self, at: datetime) -> str:
        return self.prefix + at.strftime("alerts:claimed:month:%Y%m")

    def register_documents(self, document_ids: Sequence[str]) -> list[list[str]]:
        """The commands that record `document_ids` as this tenant's (idempotent)."""
        ids = [document_id.lower() for document_id in document_ids]
        if not ids:
            return []
        return [["HSET", DOCUMENT_OWNERS, *(x for i in ids for x in (i, self.tenant))],
                ["SADD", self.documents, *ids]]

    def forget_documents(self, document_ids: Sequence[str]) -> list[list[str]]:
        """The commands that drop `document_ids` from the registry (idempotent)."""
        ids = [document_id.lower() for document_id in document_ids]
        if not ids:
            return []
        return [["HDEL", DOCUMENT_OWNERS, *ids], ["SREM", self.documents, *ids]]

    def known_keys(self, at: datetime) -> list[str]:
        """Every key of the tenant that can exist at `at`, to delete without a SCAN.

        Time-bucketed counters expire at the end of their period, so only the neighbouring
        periods can still be there. Left out: the `settled:b:<bucket>` hashes of settled
        request ids (and `settled:<id>` markers of older runtimes), which expire on their own
        (settled_marker_seconds) and hold nothing but request ids.
        """
        fixed = [self.prefix + suffix for suffix in FIXED_SUFFIXES]
        days = [at + timedelta(days=d) for d in (-1, 0, 1)]
        months = [(at.replace(day=1) + timedelta(days=32 * m)).replace(day=1)
                  if m >= 0 else (at.replace(day=1) - timedelta(days=1)) for m in (-1, 0, 1)]
        minutes = [at + timedelta(minutes=m) for m in (-2, -1, 0, 1)]
        return [*fixed, *(self.tokens_day(d) for d in days),
                *(self.tokens_month(m) for m in months),
                self.alerts, *(self.alert_claims_day(d) for d in days),
                *(self.alert_claims_month(m) for m in months),
                *(key(m) for m in minutes for key in (self.requests_minute, self.tokens_minute))]
