"""Rate limits and budgets: one Redis round trip to admit a request, one to settle it.

The decisions (what to reserve, what a refusal means for the client) are pure functions; the
atomic bookkeeping is `admit.lua` and `settle.lua`, over the tenant's hash-tagged keys.
"""

from __future__ import annotations

import calendar
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from functools import lru_cache
from importlib.resources import files
from typing import Any

from .contracts.redis_keys import TenantKeys
from .errors import ApiError
from .resp import PipelinedRedis, ReplyError, Script, ScriptCall

ADMIT = Script(files(__package__).joinpath("admit.lua").read_text())
SETTLE = Script(files(__package__).joinpath("settle.lua").read_text())

# Counters outlive their period long enough for reports (a day key two days, a month 40).
DAY_KEY_TTL_SECONDS = 2 * 86400
MONTH_KEY_TTL_SECONDS = 40 * 86400
# A settlement's marker should outlive any replay of it from the spool (a settlement Redis ran
# whose reply was lost is replayed once Redis answers again): a replay finds it and charges
# nothing. The default of `RuntimeSettings.settled_marker_seconds`.
SETTLED_MARKER_TTL_SECONDS = 86400
# Settled request ids are kept per tenant in one small hash per this many seconds (the time of
# the first attempt, so a replay finds the same hash): up to Redis's hash-max-listpack-entries
# (512 by default, ziplist before 7.0) a bucket is a listpack, ~35 bytes per request instead of
# ~130 for a key per request (bench/settled_markers.py). Compact up to 256 requests/s per tenant.
SETTLED_BUCKET_SECONDS = 2
# settle.lua's answer when the request id was settled before (a replay).
ALREADY_SETTLED = -2
# Crude but conservative input estimate: JSON bytes per token (tokenizers average ~3.5-4).
BYTES_PER_TOKEN = 3


# The usage event's JSON, compact; one encoder for all (json.dumps builds one per call when
# given separators).
_EVENT_JSON = json.JSONEncoder(separators=(",", ":"))


class Verdict(IntEnum):
    ADMITTED = 0
    SUSPENDED = 1
    NOT_PROVISIONED = 2
    REQUESTS_PER_MINUTE = 3
    TOKENS_PER_MINUTE = 4
    DAILY_BUDGET = 5
    MONTHLY_BUDGET = 6
    RESERVATION_OVER_TOKENS_PER_MINUTE = 7


@dataclass(frozen=True)
class LimitKeys:
    """The keys both scripts touch, in the scripts' KEYS order (all in the tenant's slot)."""

    limits: str
    gcra_requests: str
    gcra_tokens: str
    day: str
    month: str
    holds: str
    hold_amounts: str
    held_total: str
    usage_stream: str
    prefix: str

    def admit(self) -> list[str]:
        return [self.limits, self.gcra_requests, self.gcra_tokens, self.day, self.month,
                self.holds, self.hold_amounts, self.held_total]

    def settle(self, at: float) -> list[str]:
        """settle.lua's keys; the last: the bucket of ids settled around `at` (unix time)."""
        bucket = int(at) // SETTLED_BUCKET_SECONDS
        return [*self.admit(), self.usage_stream, f"{self.prefix}settled:b:{bucket}"]


def limit_keys(tenant: str, at: datetime) -> LimitKeys:
    return _limit_keys(tenant, at.toordinal())


@lru_cache(maxsize=4096)
def _limit_keys(tenant: str, day: int) -> LimitKeys:
    keys = TenantKeys(tenant)
    at = datetime.fromordinal(day).replace(tzinfo=UTC)
    # Not (yet) in contracts.redis_keys: GCRA state, holds and the usage stream.
    return LimitKeys(
        limits=keys.limits, gcra_requests=keys.prefix + "gcra:req",
        gcra_tokens=keys.prefix + "gcra:tok", day=keys.tokens_day(at),
        month=keys.tokens_month(at), holds=keys.prefix + "holds",
        hold_amounts=keys.prefix + "holds:amount", held_total=keys.prefix + "holds:total",
        usage_stream=keys.prefix + "usage", prefix=keys.prefix)


def estimate_input_tokens(body_bytes: int) -> int:
    """Pure: an upper-leaning estimate of a request's input tokens from its size."""
    return max(1, math.ceil(body_bytes / BYTES_PER_TOKEN))


def reservation(input_estimate: int, max_tokens: int) -> int:
    return input_estimate + max_tokens


def ms_to_period_ends(now: datetime) -> tuple[int, int]:
    """Pure: milliseconds until the UTC day ends and until the UTC month ends."""
    day_end, month_end = _period_ends(now.toordinal())
    return (math.ceil((day_end - now).total_seconds() * 1000),
            math.ceil((month_end - now).total_seconds() * 1000))


@lru_cache(maxsize=4)
def _period_ends(day: int) -> tuple[datetime, datetime]:
    """The ends (UTC) of the day and of the month that day `day` (an ordinal) is in."""
    start = datetime.fromordinal(day).replace(tzinfo=UTC)
    last = calendar.monthrange(start.year, start.month)[1]
    return (start + timedelta(days=1),
            datetime(start.year, start.month, last, tzinfo=UTC) + timedelta(days=1))


# Refusals that only wait out a limit: the client's message, with retry-after from the script.
_RATE_REFUSALS = {
    Verdict.REQUESTS_PER_MINUTE: "Requests per minute limit reached.",
    Verdict.TOKENS_PER_MINUTE: "Tokens per minute limit reached.",
    Verdict.DAILY_BUDGET: "Daily token budget exhausted.",
    Verdict.MONTHLY_BUDGET: "Monthly token budget exhausted.",
}


def refusal(verdict: Verdict, retry_after_ms: int) -> ApiError | None:
    """Pure: the client's error for a verdict (None when admitted)."""
    if verdict in _RATE_REFUSALS:
        return ApiError("rate_limit_error", _RATE_REFUSALS[verdict],
                        retry_after=retry_after_ms / 1000)
    match verdict:
        case Verdict.SUSPENDED:
            return ApiError("permission_error", "This tenant is suspended.")
        case Verdict.NOT_PROVISIONED:
            return ApiError("api_error", "This tenant's limits are not provisioned yet.",
                            status=503, retry_after=5)
        case Verdict.RESERVATION_OVER_TOKENS_PER_MINUTE:
            return ApiError("invalid_request_error",
                            "max_tokens plus the input exceeds this tenant's tokens per minute.")
    return None  # ADMITTED


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def charged(self) -> int:
        """Tokens counted against budgets: everything the model read or wrote."""
        return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
                + self.cache_read_input_tokens)


class Limiter:
    """The two scripts, run over one pipelined Redis connection."""

    def __init__(self, redis: PipelinedRedis, hold_seconds: int) -> None:
        self._redis = redis
        self._hold_ms = hold_seconds * 1000
        # Limits hash key -> (requests/min, tokens/min) as of the last admission, for the
        # per-replica fallback while Redis is unreachable.
        self.rates_seen: dict[str, tuple[int, int]] = {}

    async def admit(self, keys: LimitKeys, request_id: str, reserve: int,
                    now: datetime, *, rate_only: bool = False) -> tuple[Verdict, int]:
        """`rate_only`: requests/min alone (no tokens/min, budget or hold to settle)."""
        day_ms, month_ms = ms_to_period_ends(now)
        reply = await self._redis.run_script(
            ADMIT, keys.admit(),
            [request_id, reserve, self._hold_ms, day_ms, month_ms, int(rate_only)])
        if len(reply) == 4:
            self.rates_seen[keys.limits] = (int(reply[2]), int(reply[3]))
        return Verdict(int(reply[0])), int(reply[1])

    async def settle(self, settlement: Settlement) -> int:
        """Drop the hold, charge the usage, append the event to the tenant's usage stream;
        returns the tokens that were held (-1 when the hold had expired), or ALREADY_SETTLED
        (nothing done) when this request id was settled before."""
        return int(await self._redis.run_script(SETTLE, settlement.keys, settlement.args))

    async def settle_then(self, settlement: Settlement, then: ScriptCall) -> tuple[int, Any]:
        """`settle`, with `then` (the budget alerts' check, which must see this charge) sent
        right behind it in the same write: one Redis round trip instead of two. `then`'s
        reply may be a ReplyError (returned, not raised: the settlement stands)."""
        held, reply = await self._redis.run_scripts(
            [ScriptCall(SETTLE, settlement.keys, settlement.args), then])
        if isinstance(held, ReplyError):
            raise held
        return int(held), reply


@dataclass(frozen=True)
class Settlement:
    """One call of settle.lua, as data: it can wait in the spool while Redis is away."""

    keys: list[str]
    args: list[str | int]

    @classmethod
    def of(cls, keys: LimitKeys, request_id: str, usage: Usage, event: Mapping[str, object],
           marker_seconds: int = SETTLED_MARKER_TTL_SECONDS) -> Settlement:
        # ARGV[7] "bucket": KEYS[10] is a bucket hash (spool lines from before had 6 ARGV and
        # a key per request); its lifetime covers its width, so every id lives marker_seconds.
        return cls(keys.settle(time.time()), [request_id, usage.charged, DAY_KEY_TTL_SECONDS,
                                              MONTH_KEY_TTL_SECONDS,
                                              _EVENT_JSON.encode(event),
                                              marker_seconds + SETTLED_BUCKET_SECONDS,
                                              "bucket"])
