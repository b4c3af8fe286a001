"""The Redis key scheme shared by the operator (writes limits) and the runtime (enforces them).

Every key of a tenant starts with `tenantry:v1:{<tenant>}:`. The braces are a Redis Cluster
hash tag, so all of a tenant's keys live in one slot and one Lua script can touch them
atomically. Tenant ids are validated DNS labels (lowercase letters, digits, hyphens; no brace,
colon or glob character), so the prefix of one tenant can never be a prefix of another's:
`{acme}:` does not match `{acme2}:` nor `{acme-corp}:`, and `{a-b}:` is not `{ab}:`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .database import validate_tenant_id

SCHEME_VERSION = "v1"

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

    def tokens_day(self, at: datetime) -> str:
        return self.prefix + at.strftime("tokens:day:%Y%m%d")

    def tokens_month(self, at: datetime) -> str:
        return self.prefix + at.strftime("tokens:month:%Y%m")

    def requests_minute(self, at: datetime) -> str:
        return self.prefix + at.strftime("rate:req:%Y%m%d%H%M")

    def tokens_minute(self, at: datetime) -> str:
        return self.prefix + at.strftime("rate:tok:%Y%m%d%H%M")
