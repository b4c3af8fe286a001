"""The operator's one settings object, read from TENANTRY_* environment variables."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Mounted into every Pod with a service account token: the namespace the Pod runs in.
_POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _own_namespace() -> str:
    """The Pod's namespace in a cluster; `default` when running outside one."""
    try:
        return _POD_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def _own_identity() -> str:
    """POD_NAME (downward API) in a cluster; host and pid elsewhere, so local processes differ."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENANTRY_", env_nested_delimiter="__")

    # Kopf
    # 32: a reconcile mostly waits on the API server and Postgres; bench/README.md
    # (operator_scale) measured 100 tenants Ready in half the time of 8.
    worker_limit: int = Field(32, ge=1, le=256, description="Tenants reconciled concurrently.")
    reconcile_interval_seconds: float = Field(
        120.0, gt=0, description="Level-based resync: how often a timer re-applies every Tenant."
    )

    # Quiet, prompt and clear (issue 8): a TenantPlan edit re-reconciles its tenants at once,
    # paced so that a plan of thousands of tenants does not starve the rest.
    plan_rollout_per_second: float = Field(
        50.0, gt=0, description="Tenants of a changed TenantPlan reconciled per second at most."
    )

    maintenance_interval_seconds: float = Field(
        3600.0, gt=0, description="How often monthly partitions are created ahead."
    )

    # Leader election on a coordination.k8s.io/v1 Lease (`python -m tenantry_operator`): one
    # replica reconciles, the others stand by. kopf itself always runs standalone.
    lease_name: str = Field("tenantry-operator", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    lease_namespace: str = Field(default_factory=_own_namespace, min_length=1)
    lease_identity: str = Field(default_factory=_own_identity, min_length=1,
                                description="This replica's name in the Lease's holderIdentity.")
    # 30/20/2 s, not client-go's 15/10/2: at load average ~20 on 2 cores a leader went 10.3 s
    # without renewing. 20 s is twice that; the 10 s between deadline and duration cover a
    # standby's own delay in seeing the Lease; a crashed leader is replaced within ~30 s.
    lease_duration_seconds: int = Field(
        30, ge=1, description="A standby takes the Lease over after it went unrenewed this long."
    )
    lease_renew_deadline_seconds: float = Field(
        20.0, gt=0, description="The leader exits when it could not renew for this long."
    )
    lease_retry_period_seconds: float = Field(
        2.0, gt=0, description="How often the leader renews and standbys try to acquire."
    )
    health_port: int | None = Field(
        None, ge=1, le=65535, description="Serve GET /healthz here (liveness and readiness)."
    )

    # Kubernetes layout
    namespace_prefix: str = Field("tenant-", pattern=r"^[a-z][a-z0-9-]{0,15}$")
    runtime_namespace: str = Field(
        "tenantry-system", description="Namespace of the runtime; allowed into tenant namespaces."
    )
    credentials_namespace: str = Field(
        "tenantry-system",
        description=(
            "The operator's own namespace: it keeps a copy of every credential it generates"
            " there, to restore a tenant's Secret deleted by hand."
        ),
    )

    # Guardrails of tenant namespaces (guardrails.py)
    cluster_cidrs: tuple[str, ...] = Field(
        (),
        description=(
            "The cluster's Pod and Service CIDRs, cut out of every tenant's allowEgressCIDRs:"
            " a tenant's 0.0.0.0/0 then reaches the outside but no Pod of the cluster (CNIs"
            " that match ipBlocks against Pod IPs would let it reach every namespace without"
            " policies of its own)."
        ),
    )

    # Data plane
    database_url: SecretStr | None = Field(
        None, description="Admin DSN of the shared Postgres (pool and bridge tenants)."
    )
    database_host_for_runtime: str = Field(
        "tenantry-postgres.tenantry-system.svc",
        description="Host:port of the shared Postgres as the runtime reaches it (for config).",
    )
    redis_url: SecretStr | None = Field(None, description="Redis holding limits and counters.")
    silo_image: str = Field("pgvector/pgvector:0.8.1-pg18", description="Image of silo Postgres.")
    silo_dsn_overrides: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "tenant -> admin DSN of its silo database. Needed when the operator runs outside the"
            " cluster and cannot reach the silo Service (development, tests)."
        ),
    )
    # bench/README.md: one shared index (iterative scans, the (tenant_id, id) primary key for
    # small tenants) meets the goals without a full-table index build per onboarded tenant.
    pool_index_strategy: Literal["partial", "shared"] = Field(
        "shared", description="Pool collections: one shared HNSW index, or one partial per tenant."
    )

    # Budget alerts (issue 10, tenantry_operator.alerts): delivery of the alerts the runtime
    # records in Redis, by the leader.
    alerts_interval_seconds: float = Field(
        10.0, ge=0, description="How often recorded budget alerts are delivered; 0 turns it off."
    )
    alerts_webhook_timeout_seconds: float = Field(5.0, gt=0)
    alerts_webhook_allow_private: bool = Field(
        False, description="Let webhooks reach private, loopback and link-local addresses."
    )
    alerts_webhook_give_up_seconds: float = Field(
        86400.0, gt=0, description="Stop retrying a webhook this long after its alert."
    )

    @model_validator(mode="after")
    def _lease_timings_leave_no_overlap(self) -> Self:
        # The leader gives up before a standby may take over (deadline < duration), and tries
        # to renew several times before its deadline (retry period < deadline).
        if not (self.lease_retry_period_seconds < self.lease_renew_deadline_seconds
                < self.lease_duration_seconds):
            raise ValueError(
                "lease timings must satisfy retry period < renew deadline < duration, got "
                f"{self.lease_retry_period_seconds} / {self.lease_renew_deadline_seconds} / "
                f"{self.lease_duration_seconds}")
        return self


@lru_cache(maxsize=1)
def get_settings() -> OperatorSettings:
    return OperatorSettings()
