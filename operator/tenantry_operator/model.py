"""Tenant and TenantPlan as typed models, merged into the effective spec the builders consume."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

GROUP = "tenantry.dev"
VERSION = "v1alpha1"
ISOLATION_ORDER = ("pool", "bridge", "silo")


class Isolation(StrEnum):
    POOL = "pool"
    BRIDGE = "bridge"
    SILO = "silo"

    @property
    def rank(self) -> int:
        return ISOLATION_ORDER.index(self.value)


class _Camel(BaseModel):
    """Accepts the CRD's camelCase keys; unknown keys are ignored (the API server prunes them)."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore")


class SecretRef(_Camel):
    name: str
    key: str = "api-key"


class Endpoint(_Camel):
    type: str = "shared"
    url: str | None = None
    secret_ref: SecretRef | None = Field(None, alias="secretRef")


class Budgets(_Camel):
    daily_tokens: int | None = Field(None, alias="dailyTokens")
    monthly_tokens: int | None = Field(None, alias="monthlyTokens")
    overage_allowed: bool | None = Field(None, alias="overageAllowed")


class RateLimits(_Camel):
    requests_per_minute: int | None = Field(None, alias="requestsPerMinute")
    tokens_per_minute: int | None = Field(None, alias="tokensPerMinute")


class AiSpec(_Camel):
    model: str | None = None
    endpoint: Endpoint = Endpoint()
    max_tokens_per_request: int | None = Field(None, alias="maxTokensPerRequest")
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = Field(RateLimits(), alias="rateLimits")


class Hnsw(_Camel):
    m: int = 16
    ef_construction: int = Field(64, alias="efConstruction")


class RagSpec(_Camel):
    enabled: bool = True
    embedding_dimensions: int = Field(384, alias="embeddingDimensions")
    top_k: int = Field(5, alias="topK")
    hnsw: Hnsw = Hnsw()


class Storage(_Camel):
    size: str
    storage_class_name: str | None = Field(None, alias="storageClassName")


class DatabaseSpec(_Camel):
    storage: Storage | None = None
    resources: dict[str, dict[str, str | int]] = Field(default_factory=dict)


class NetworkSpec(_Camel):
    allow_ingress_from_namespaces: tuple[str, ...] = Field((), alias="allowIngressFromNamespaces")
    allow_egress_cidrs: tuple[str, ...] = Field((), alias="allowEgressCIDRs")


class TenantSpec(_Camel):
    plan: str
    isolation: Isolation = Isolation.POOL
    region: str = ""
    ai: AiSpec = AiSpec()
    rag: RagSpec = RagSpec()
    database: DatabaseSpec = DatabaseSpec()
    network: NetworkSpec = NetworkSpec()
    deletion_policy: str = Field("Retain", alias="deletionPolicy")
    suspended: bool = False

    @classmethod
    def from_body(cls, spec: Mapping[str, Any]) -> TenantSpec:
        data = dict(spec)
        data["plan"] = spec.get("planRef", {}).get("name", "")
        data["region"] = spec.get("dataResidency", {}).get("region", "")
        return cls.model_validate(data)


class PlanBilling(_Camel):
    included_monthly_tokens: int = Field(0, alias="includedMonthlyTokens")
    overage_price_per_million_tokens: str = Field("0", alias="overagePricePerMillionTokens")
    currency: str = "USD"


class PlanBudgets(_Camel):
    daily_tokens: int = Field(100_000, alias="dailyTokens")
    monthly_tokens: int = Field(1_000_000, alias="monthlyTokens")
    overage_allowed: bool = Field(False, alias="overageAllowed")


class PlanRateLimits(_Camel):
    requests_per_minute: int = Field(60, alias="requestsPerMinute")
    tokens_per_minute: int = Field(100_000, alias="tokensPerMinute")


class PlanSpec(_Camel):
    model: str
    max_tokens_per_request: int = Field(4096, alias="maxTokensPerRequest")
    budgets: PlanBudgets = PlanBudgets()
    rate_limits: PlanRateLimits = Field(PlanRateLimits(), alias="rateLimits")
    allowed_isolation: tuple[Isolation, ...] = Field((Isolation.POOL,), alias="allowedIsolation")
    billing: PlanBilling = PlanBilling()


class EffectiveAi(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    endpoint: Endpoint
    max_tokens_per_request: int
    daily_tokens: int
    monthly_tokens: int
    overage_allowed: bool
    requests_per_minute: int
    tokens_per_minute: int


class EffectiveSpec(BaseModel):
    """What the builders consume: the Tenant's fields, with the plan filling every gap."""

    model_config = ConfigDict(frozen=True)

    name: str
    uid: str
    generation: int
    plan: str
    isolation: Isolation
    region: str
    ai: EffectiveAi
    rag: RagSpec
    database: DatabaseSpec
    network: NetworkSpec
    deletion_policy: str
    suspended: bool
    billing: PlanBilling


class PlanViolation(ValueError):
    """The Tenant asks for something its plan does not allow."""


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def effective_spec(
    name: str, uid: str, generation: int, tenant: TenantSpec, plan: PlanSpec
) -> EffectiveSpec:
    """Merge a Tenant over its plan: the Tenant's own fields win; the plan fills the rest."""
    if tenant.isolation not in plan.allowed_isolation:
        allowed = ", ".join(i.value for i in plan.allowed_isolation)
        raise PlanViolation(
            f"plan {tenant.plan!r} allows isolation {allowed}; the Tenant asks for "
            f"{tenant.isolation.value}"
        )
    ai = tenant.ai
    return EffectiveSpec(
        name=name,
        uid=uid,
        generation=generation,
        plan=tenant.plan,
        isolation=tenant.isolation,
        region=tenant.region,
        ai=EffectiveAi(
            model=_first(ai.model, plan.model),
            endpoint=ai.endpoint,
            max_tokens_per_request=_first(ai.max_tokens_per_request, plan.max_tokens_per_request),
            daily_tokens=_first(ai.budgets.daily_tokens, plan.budgets.daily_tokens),
            monthly_tokens=_first(ai.budgets.monthly_tokens, plan.budgets.monthly_tokens),
            overage_allowed=_first(ai.budgets.overage_allowed, plan.budgets.overage_allowed),
            requests_per_minute=_first(
                ai.rate_limits.requests_per_minute, plan.rate_limits.requests_per_minute
            ),
            tokens_per_minute=_first(
                ai.rate_limits.tokens_per_minute, plan.rate_limits.tokens_per_minute
            ),
        ),
        rag=tenant.rag,
        database=tenant.database,
        network=tenant.network,
        deletion_policy=tenant.deletion_policy,
        suspended=tenant.suspended,
        billing=plan.billing,
    )
