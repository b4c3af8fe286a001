"""The Redis key scheme shared by the operator (writes limits) and the runtime (enforces them).

Every key of a tenant starts with `tenantry:v1:{<tenant>}:`. The braces are a Redis Cluster
hash tag, so all of a tenant's keys live in one slot and one Lua script can touch them
atomically. Tenant ids are validated (lowercase letters and digits), so the prefix of one
tenant can never be a prefix of another's: `{acme}:` does not match `{acme2}:`.
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
