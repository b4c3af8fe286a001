"""Rate limits while Redis is unreachable: each replica enforces its share locally.

The share of a tenant's requests/min and tokens/min is the limit divided by the expected
number of replicas (`RuntimeSettings.expected_replicas`), as token buckets holding one
minute's share (the burst the Redis GCRA allows too). The limits are the last ones Redis
returned to this worker at an admission; a tenant this worker never admitted has none here
and is refused (503), since a limit it never saw cannot be enforced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import ApiError


@dataclass
class Bucket:
    capacity: float
    level: float
    at: float

    def take(self, amount: float, now: float) -> float:
        """0 when `amount` was taken, else the seconds until it could be."""
        rate = self.capacity / 60
        self.level = min(self.capacity, self.level + (now - self.at) * rate)
        self.at = now
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) / rate if rate > 0 else 60.0


@dataclass
class LocalLimits:
    replicas: int
    _buckets: dict[str, tuple[Bucket, Bucket]] = field(default_factory=dict)

    def admit(self, tenant: str, rates: tuple[int, int] | None, reserve: int,
              now: float | None = None) -> ApiError | None:
        """None when admitted on this replica's share, else the client's error."""
        if rates is None:
            return ApiError("api_error", "Limits are unavailable; try again shortly.",
                            status=503, retry_after=1)
        now = time.monotonic() if now is None else now
        rpm, tpm = (max(0.0, rate / self.replicas) for rate in rates)
        buckets = self._buckets.get(tenant)
        if buckets is None or (buckets[0].capacity, buckets[1].capacity) != (rpm, tpm):
            buckets = (Bucket(rpm, rpm, now), Bucket(tpm, tpm, now))
            self._buckets[tenant] = buckets
        requests, tokens = buckets
        if tpm and reserve > tpm:
            return ApiError("invalid_request_error",
                            "max_tokens plus the input exceeds this tenant's tokens per minute.")
        wait = requests.take(1, now)
        if wait:
            return ApiError("rate_limit_error", "Requests per minute limit reached.",
                            retry_after=wait)
        wait = tokens.take(reserve, now) if reserve else 0.0
        if wait:
            requests.level += 1  # not admitted: the request is not counted
            return ApiError("rate_limit_error", "Tokens per minute limit reached.",
                            retry_after=wait)
        return None


@dataclass
class LogThrottle:
    """At most one log line per key per `seconds`: an outage under load must not flood logs."""

    seconds: float = 10.0
    _last: dict[str, float] = field(default_factory=dict)
    _quiet: dict[str, int] = field(default_factory=dict)

    def due(self, key: str, now: float | None = None) -> int | None:
        """None: stay quiet; else log now, mentioning how many lines were held back."""
        now = time.monotonic() if now is None else now
        if now - self._last.get(key, -self.seconds) < self.seconds:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._quiet.pop(key, 0)
