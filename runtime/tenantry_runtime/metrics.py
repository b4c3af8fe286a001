"""Prometheus metrics of one worker process, rendered in the text exposition format.

Names follow OpenTelemetry's GenAI conventions where they fit (`gen_ai_client_token_usage`,
`gen_ai_server_request_duration_seconds`, labels `gen_ai_token_type`, `gen_ai_request_model`);
the rest are `tenantry_runtime_*`. No client library: the format is a few lines, and the hot
path only adds to dicts.

Cardinality: at most `max_tenants` tenants get their own `tenant` label, first come first
served for the life of the process (a series never changes label); every later tenant is
counted under `tenant="other"`. Each worker process has its own registry (the scrape of one
Pod sees one worker at a time when several share a port): run one worker per container, or
scrape each worker's port, and sum in PromQL.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from .limits import Usage

OTHER = "other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# OpenTelemetry's recommended bucket boundaries for these two instruments.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TOKEN_TYPES = ("input", "output", "cache_creation", "cache_read")

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = [*labels, extra] if extra else list(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


@dataclass
class Family:
    """A counter or gauge: one value per label set."""

    name: str
    help: str
    kind: str = "counter"
    values: dict[Labels, float] = field(default_factory=dict)

    def add(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels.items())
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {_number(value)}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    # labels -> (per-bucket counts, sum, count)
    values: dict[Labels, tuple[list[int], float, int]] = field(default_factory=dict)

    def observe(self, value: float, **labels: str) -> None:
        self.observe_series(tuple(labels.items()), value)

    def observe_series(self, key: Labels, value: float) -> None:
        counts, total, count = self.values.get(key) or ([0] * len(self.buckets), 0.0, 0)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(counts):
            counts[index] += 1
        self.values[key] = (counts, total + value, count + 1)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, (counts, total, count) in sorted(self.values.items()):
            running = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                running += n
                yield f"{self.name}_bucket{_labels(labels, ('le', _number(bound)))} {running}"
            yield f"{self.name}_bucket{_labels(labels, ('le', '+Inf'))} {count}"
            yield f"{self.name}_sum{_labels(labels)} {_number(total)}"
            yield f"{self.name}_count{_labels(labels)} {count}"


@dataclass
class TenantLabels:
    """The `tenant` label value of a tenant: its id for the first `cap` seen, else "other"."""

    cap: int
    _given: set[str] = field(default_factory=set)

    def __call__(self, tenant: str) -> str:
        if tenant in self._given:
            return tenant
        if len(self._given) < self.cap:
            self._given.add(tenant)
            return tenant
        return OTHER

    def labelled(self, tenant: str) -> bool:
        """Whether `tenant` has (or can still get) a label of its own."""
        return self(tenant) != OTHER


class Metrics:
    """The runtime's instruments; `render` adds the counters other objects keep."""

    def __init__(self, max_tenants: int) -> None:
        self.tenant = TenantLabels(max_tenants)
        self.requests = Family("tenantry_runtime_requests_total",
                               "Requests by tenant and the HTTP status the client got.")
        self.tokens = Histogram("gen_ai_client_token_usage",
                                "Tokens per request by type (input, output, cache_creation, "
                                "cache_read).", TOKEN_BUCKETS)
        self.duration = Histogram("gen_ai_server_request_duration_seconds",
                                  "Time from request to the last byte, admitted requests.",
                                  DURATION_BUCKETS)
        self.cost = Family("tenantry_runtime_cost_total",
                           "Cost of the requests from the price table (exact in ai_usage_logs).")
        self.rejections = Family("tenantry_runtime_rejections_total",
                                 "Requests refused before the upstream call, by reason.")
        self.upstream_errors = Family("tenantry_runtime_upstream_errors_total",
                                      "Upstream 429/5xx, failures (502) and timeouts (504).")
        self.fallback = Family("tenantry_runtime_limits_fallback_total",
                               "Admissions decided without Redis, by outcome.")
        # Budget alerts claimed by this worker (issue 10): summed over replicas, one per
        # tenant, budget, threshold and period.
        self.alerts = Family("tenantry_runtime_budget_alerts_total",
                             "Budget alerts (80%, 100%) this worker claimed and recorded.")
        self._families = [self.requests, self.cost, self.rejections, self.upstream_errors,
                          self.fallback, self.alerts]
        # (tenant label, model) -> the label sets of its token and duration series, built once
        # (as many as the series themselves: labels are capped, models checked per tenant).
        self._series: dict[tuple[str, str], tuple[tuple[Labels, ...], Labels]] = {}

    def settled(self, tenant: str, model: str, status: int, usage: Usage, seconds: float,
                cost: Decimal | None, currency: str) -> None:
        label = self.tenant(tenant)
        self.requests.add(tenant=label, status=str(status))
        series = self._series.get((label, model))
        if series is None:
            series = self._series[label, model] = (tuple(
                (("tenant", label), ("gen_ai_request_model", model), ("gen_ai_token_type", kind))
                for kind in TOKEN_TYPES), (("tenant", label), ("gen_ai_request_model", model)))
        token_series, duration_series = series
        for key, amount in zip(token_series, (
                usage.input_tokens, usage.output_tokens, usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens), strict=True):
            self.tokens.observe_series(key, amount)
        self.duration.observe_series(duration_series, seconds)
        if cost is not None:
            self.cost.add(float(cost), tenant=label, currency=currency)
        # 429/5xx/529 from the upstream, 502/504 for one that failed or timed out (not 499, a
        # client that left, nor the upstream's 4xx about the request itself).
        if status == 429 or status >= 500:
            self.upstream_errors.add(tenant=label, status=str(status))

    def alert(self, tenant: str, budget: str, threshold: int) -> None:
        self.alerts.add(tenant=self.tenant(tenant), budget=budget, threshold=str(threshold))

    def rejected(self, tenant: str, reason: str, status: int) -> None:
        label = self.tenant(tenant)
        self.rejections.add(tenant=label, reason=reason)
        self.requests.add(tenant=label, status=str(status))

    def render(self, *, revisions: Mapping[str, int], failures: Mapping[str, int],
               refused: Mapping[str, int], stale_ignored: int, in_flight: int, waiting: int,
               redactions: Mapping[str, int] | None = None) -> bytes:
        lines: list[str] = []
        for family in self._families:
            lines.extend(family.render())
        lines.extend(self.tokens.render())
        lines.extend(self.duration.render())
        revision = Family("tenantry_runtime_config_revision",
                          "Revision of the tenant config in force (labelled tenants only).",
                          "gauge")
        for tenant, number in revisions.items():
            if self.tenant.labelled(tenant):
                revision.add(number, tenant=tenant)
        lines.extend(revision.render())
        lines.extend(_from_counter("tenantry_runtime_failures_total",
                                   "Failures with no client to tell, by reason.", failures))
        # The response sanitizer's security events (sanitize.py), by kind.
        lines.extend(_from_counter("tenantry_runtime_redactions_total",
                                   "Other tenants' identifiers redacted from answers.",
                                   redactions or {}, label="kind"))
        lines.extend(_from_counter("tenantry_runtime_config_refused_total",
                                   "Tenant records refused (the last good one stays).", refused))
        for name, help_text, value, kind in (
                ("tenantry_runtime_config_stale_ignored_total",
                 "Tenant records ignored for a stale revision.", stale_ignored, "counter"),
                ("tenantry_runtime_in_flight", "Admitted requests in flight (this worker).",
                 in_flight, "gauge"),
                ("tenantry_runtime_saturation_waiting",
                 "Requests waiting for a slot under saturation (this worker).", waiting,
                 "gauge")):
            family = Family(name, help_text, kind)
            family.add(value)
            lines.extend(family.render())
        return ("\n".join(lines) + "\n").encode()


def _from_counter(name: str, help_text: str, counts: Mapping[str, int],
                  label: str = "reason") -> Iterable[str]:
    family = Family(name, help_text)
    for reason, value in counts.items():
        family.add(value, **{label: reason})
    return family.render()


def merged(*counters: Mapping[str, int]) -> Counter[str]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return total

