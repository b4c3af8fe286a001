"""Budget alerts at 80% and 100% of the daily and monthly token budgets and the allowance.

Detection runs in the runtime, after each settlement that charged tokens (`check_alerts`):
`alerts.lua` compares the tenant's day and month counters with its limits hash and claims each
crossed threshold with HSETNX in the period's claims hash, recording the alert in the tenant's
`alerts` stream in the same atomic step. However many replicas settle at once, exactly one
claims an alert, once per period (the day, or the month for monthly budget and allowance). It
is level-based: a check missed (Redis away, a settlement replayed from the spool) is made by
the next request.

Delivery runs in the operator (tenantry_operator.alerts), which has the Kubernetes access the
runtime lacks: an Event on the Tenant, the BudgetAlert condition, the webhook to the tenant's
URL signed with `sign` (verify with `verify`, the snippet in docs/billing-export-alerts.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib.resources import files
from typing import Any

from .contracts.redis_keys import TenantKeys
from .resp import PipelinedRedis, Script, ScriptCall

ALERTS = Script(files(__package__).joinpath("alerts.lua").read_text())
THRESHOLDS = (80, 100)
BUDGETS = ("daily", "monthly", "allowance")
# Claims outlive their period (a late settlement of yesterday must not fire it again).
DAY_CLAIMS_TTL_SECONDS = 2 * 86400
MONTH_CLAIMS_TTL_SECONDS = 40 * 86400
STREAM_MAX_LENGTH = 1000
SIGNATURE_HEADER = "Tenantry-Signature"
ALERT_ID_HEADER = "Tenantry-Alert-Id"
# Receivers refuse signatures older (or newer) than this: a captured delivery cannot be replayed.
SIGNATURE_TOLERANCE_SECONDS = 300


def periods(at: datetime) -> tuple[str, str]:
    """Pure: the day and month labels of `at` (UTC), as alerts name their period."""
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d"), at.strftime("%Y-%m")


def period_of(budget: str, at: datetime) -> str:
    day, month = periods(at)
    return day if budget == "daily" else month


async def check_alerts(redis: PipelinedRedis, tenant: str, at: datetime,
                       now: datetime | None = None) -> list[tuple[str, int]]:
    """Claim the thresholds the tenant's spend has crossed in the periods of `at` (the
    request's start, whose counters the settlement charged); returns those claimed now."""
    call = alerts_call(tenant, at, now)
    return fired_alerts(await redis.run_script(call.script, call.keys, call.args))


def alerts_call(tenant: str, at: datetime, now: datetime | None = None) -> ScriptCall:
    """Pure (but for the clock): the alerts.lua run `check_alerts` makes; the runtime sends
    it right behind a settlement, in the same write (`Limiter.settle`)."""
    keys, day, month = _script_keys(tenant, at.astimezone(UTC).toordinal())
    stamp = _stamp(int(time.time())) if now is None else now.strftime(STAMP_FORMAT)
    return ScriptCall(ALERTS, keys, [day, month, DAY_CLAIMS_TTL_SECONDS,
                                     MONTH_CLAIMS_TTL_SECONDS, stamp, STREAM_MAX_LENGTH])


def fired_alerts(reply: Any) -> list[tuple[str, int]]:
    """Pure: alerts.lua's reply as (budget, threshold) pairs claimed now."""
    flat = [item.decode() if isinstance(item, bytes) else str(item) for item in reply or []]
    return [(flat[i], int(flat[i + 1])) for i in range(0, len(flat), 2)]


STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@lru_cache(maxsize=2)
def _stamp(unix_second: int) -> str:
    """When an alert is claimed, formatted once per second (a check per charged request)."""
    return datetime.fromtimestamp(unix_second, UTC).strftime(STAMP_FORMAT)


@lru_cache(maxsize=4096)
def _script_keys(tenant: str, day: int) -> tuple[tuple[str, ...], str, str]:
    """The script's keys and period labels, once per tenant and day (a check per request)."""
    keys, at = TenantKeys(tenant), datetime.fromordinal(day).replace(tzinfo=UTC)
    return ((keys.limits, keys.tokens_day(at), keys.tokens_month(at), keys.alerts,
             keys.alert_claims_day(at), keys.alert_claims_month(at)), *periods(at))


@dataclass(frozen=True)
class BudgetAlert:
    """One alert as recorded in the stream and sent to the tenant."""

    tenant: str
    budget: str  # daily, monthly or allowance
    threshold: int  # 80 or 100
    period: str  # 2026-11-27 for daily, 2026-11 for the others
    used: int
    limit: int
    at: str  # RFC 3339, when it was claimed

    @property
    def id(self) -> str:
        """Stable: the same alert has the same id on every delivery (receivers dedupe on it)."""
        return f"{self.tenant}.{self.budget}.{self.period}.{self.threshold}"

    @classmethod
    def from_stream(cls, tenant: str, fields: Mapping[bytes, bytes]) -> BudgetAlert:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(tenant, text["budget"], int(text["threshold"]), text["period"],
                   int(float(text["used"])), int(float(text["limit"])), text["at"])

    def payload(self) -> dict[str, object]:
        return {"type": "budget.threshold_reached", "id": self.id, **asdict(self)}

    def body(self) -> bytes:
        return json.dumps(self.payload(), separators=(",", ":"), sort_keys=True).encode()

    def describe(self) -> str:
        what = "allowance" if self.budget == "allowance" else f"{self.budget} token budget"
        return (f"{self.threshold}% of the {what} used in {self.period}: "
                f"{self.used} of {self.limit} tokens")


def sign(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The Tenantry-Signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, now: float | None = None,
           tolerance: int = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """A receiver's check: the signature matches the body and is recent (replays fail)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance:
        return False
    expected = sign(secret, body, stamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))

