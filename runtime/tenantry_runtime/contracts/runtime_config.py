"""The per-tenant runtime configuration: rendered by the operator, read by the runtime.

One ConfigMap per tenant (key `config.json`, label `tenantry.dev/tenant`). Secrets are never
in it: it names the Secret that holds them. `revision` only grows, so the runtime can ignore
a stale write that arrives after a newer one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONFIGMAP_NAME = "tenantry-runtime-config"
CONFIGMAP_KEY = "config.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseLocation(_Frozen):
    """Where the tenant's rows live."""

    kind: Literal["shared", "schema", "dedicated"]
    schema_name: str = Field(description="Schema holding the tenant's tables.")
    host: str | None = Field(None, description="host:port of a dedicated (silo) database.")
    database: str | None = None
    credentials_secret: str | None = Field(
        None, description="Secret in the tenant namespace with `username` and `password`."
    )


class Collection(_Frozen):
    enabled: bool
    table: str | None
    dimensions: int
    top_k: int
    shared: bool = Field(description="True when the table is shared (pool): filter by tenant.")


class Endpoint(_Frozen):
    type: Literal["shared", "dedicated"]
    url: str | None = None
    secret_name: str | None = None
    secret_key: str | None = None


class TenantRuntimeConfig(_Frozen):
    revision: int = Field(ge=0)
    tenant: str
    isolation: Literal["pool", "bridge", "silo"]
    suspended: bool
    model: str
    max_tokens_per_request: int
    endpoint: Endpoint
    database: DatabaseLocation
    collection: Collection
    redis_key_prefix: str
