"""The operator's one settings object, read from TENANTRY_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENANTRY_", env_nested_delimiter="__")

    # Kopf
    worker_limit: int = Field(8, ge=1, le=256, description="Tenants reconciled concurrently.")
    peering: bool = Field(False, description="Use kopf peering (needs the peering CRDs).")
    reconcile_interval_seconds: float = Field(
        120.0, gt=0, description="Level-based resync: how often a timer re-applies every Tenant."
    )

    maintenance_interval_seconds: float = Field(
        3600.0, gt=0, description="How often monthly partitions are created ahead."
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


@lru_cache(maxsize=1)
def get_settings() -> OperatorSettings:
    return OperatorSettings()
