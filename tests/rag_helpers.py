"""Tenants for RAG tests: pool tenants with a collection in the shared table, and bridge
tenants whose record carries their own login's DSN (written the way the operator will)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from runtime_helpers import RuntimeServer, tenant_config, wait_for, write_limits
from tenantry_runtime.api_keys import generate_key, record_for
from tenantry_runtime.contracts.database import bridge_schema
from tenantry_runtime.contracts.runtime_config import Collection, DatabaseLocation
from tenantry_runtime.store import TenantRecord


@dataclass
class RagTenants:
    server: RuntimeServer

    def add(self, tenant: str, **config: object) -> str:
        return self.server.add_tenant(tenant, **config)["main"]

    def pool(self, tenant: str, dimensions: int = 384, top_k: int = 4) -> str:
        return self.add(tenant, collection=Collection(
            enabled=True, table=f"tenantry.tenant_embeddings_d{dimensions}",
            dimensions=dimensions, top_k=top_k, shared=True))

    def bridge(self, tenant: str, dsn: str, top_k: int = 4) -> str:
        """A bridge tenant: rows in its own schema, reached through its own login."""
        schema = bridge_schema(tenant)
        write_limits(self.server.redis_url, tenant)
        key = generate_key()[0]
        self.server.keys[tenant] = {"main": key}
        record = TenantRecord(
            config=tenant_config(
                tenant, isolation="bridge",
                database=DatabaseLocation(kind="schema", schema_name=schema),
                collection=Collection(enabled=True, table=f"{schema}.embeddings",
                                      dimensions=384, top_k=top_k, shared=False)),
            api_keys=(record_for(key, "main", None),), database_dsn=dsn)
        data = record.model_dump(mode="json")
        data["database_dsn"] = dsn  # pydantic masks SecretStr
        self.server.write_raw(tenant, json.dumps(data).encode())
        wait_for(lambda: self.server.store.get(tenant) == record, 10, f"tenant {tenant} loaded")
        return key
