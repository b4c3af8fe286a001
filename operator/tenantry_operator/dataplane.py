"""Data-plane reconcile steps: database location, collection, Redis limits, runtime config."""

from __future__ import annotations

import base64
import secrets

from lightkube.resources.apps_v1 import StatefulSet
from lightkube.resources.core_v1 import Secret
from redis.asyncio import Redis
from tenantry_runtime.contracts.database import SHARED_SCHEMA, bridge_role, bridge_schema
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.contracts.runtime_config import (
    Collection,
    DatabaseLocation,
    Endpoint,
    TenantRuntimeConfig,
)

from . import builders, database, upgrade
from .conditions import Condition
from .kube import Kube, as_dict
from .model import EffectiveSpec, Isolation
from .quotas import write_limits
from .settings import OperatorSettings
from .steps import StepContext, StepFailed


def shared_dsn(settings: OperatorSettings) -> str:
    if settings.database_url is None:
        raise StepFailed(Condition("DatabaseReady", False, "NoDatabaseConfigured",
                                   "TENANTRY_DATABASE_URL is not set"), retry_after=60)
    return settings.database_url.get_secret_value()


async def secret_value(kube: Kube, namespace: str, name: str, key: str) -> str | None:
    obj = await kube.get(Secret, name, namespace)
    data = (as_dict(obj).get("data") or {}) if obj is not None else {}
    return base64.b64decode(data[key]).decode() if key in data else None


async def ensure_credentials(ctx: StepContext, name: str, username: str, database_name: str,
                             host: str) -> str:
    """The Secret is the source of truth for a password: generated once, never rotated here."""
    password = await secret_value(ctx.kube, ctx.namespace, name, "password")
    if password is None:
        password = secrets.token_urlsafe(24)
    await ctx.kube.apply(builders.credentials_secret(
        ctx.spec, ctx.namespace, name, username, password, database_name, host))
    return password


# --- silo --------------------------------------------------------------------------------------


async def ensure_silo_server(ctx: StepContext) -> str:
    """Apply the silo's objects; return its admin DSN once its Pod is Ready."""
    ns, spec = ctx.namespace, ctx.spec
    host = builders.silo_host(ns)
    await ensure_credentials(ctx, builders.SILO_ADMIN_SECRET, "postgres",
                                              builders.SILO_DATABASE, host)
    for manifest in (*builders.silo_services(spec, ns),
                     builders.silo_statefulset(spec, ns, ctx.settings.silo_image),
                     builders.silo_disruption_budget(spec, ns)):
        await ctx.kube.apply(manifest)
    ctx.provisioned["statefulSet"] = builders.SILO_NAME
    sts = await ctx.kube.get(StatefulSet, builders.SILO_NAME, ns)
    ready = int(((as_dict(sts) if sts else {}).get("status") or {}).get("readyReplicas") or 0)
    if ready < 1:
        raise StepFailed(Condition("DatabaseReady", False, "WaitingForSiloPod",
                                   f"StatefulSet {ns}/{builders.SILO_NAME} has no Ready Pod yet"),
                         retry_after=3)
    return await silo_dsn(ctx.kube, ctx.settings, spec.name, ns)


async def silo_dsn(kube: Kube, settings: OperatorSettings, tenant: str, namespace: str) -> str:
    """Admin DSN of a silo: the override when set (operator outside the cluster), else the
    client Service with the password from the silo's admin Secret."""
    override = settings.silo_dsn_overrides.get(tenant)
    if override:
        return override
    password = await secret_value(kube, namespace, builders.SILO_ADMIN_SECRET, "password")
    if password is None:
        raise RuntimeError(f"Secret {namespace}/{builders.SILO_ADMIN_SECRET} has no password")
    host = builders.silo_host(namespace).split(":")[0]
    return (f"postgresql://postgres:{password}@{host}:{builders.SILO_PORT}"
            f"/{builders.SILO_DATABASE}")


# --- database location -------------------------------------------------------------------------


async def ensure_database(ctx: StepContext) -> Condition:
    """Provision the tenant at its isolation level; raise it in place when the spec asks."""
    spec, shared = ctx.spec, shared_dsn(ctx.settings)
    current = await database.in_database(shared, lambda c: upgrade.current_isolation(c, spec.name))
    if current is not None and current.rank > spec.isolation.rank:
        return Condition("DatabaseReady", False, "IsolationLowered",
                         f"data lives at {current.value}; lowering to {spec.isolation.value} "
                         "is not supported")
    password = ""
    if spec.isolation is not Isolation.POOL:
        host = (builders.silo_host(ctx.namespace) if spec.isolation is Isolation.SILO
                else ctx.settings.database_host_for_runtime)
        dbname = builders.SILO_DATABASE if spec.isolation is Isolation.SILO else "tenantry"
        password = await ensure_credentials(ctx, builders.TENANT_DB_SECRET,
                                            bridge_role(spec.name), dbname, host)
        ctx.provisioned["credentialsSecret"] = builders.TENANT_DB_SECRET
        ctx.provisioned["role"] = bridge_role(spec.name)
    target = shared
    if spec.isolation is Isolation.SILO:
        target = await ensure_silo_server(ctx)
        await database.in_database(target, database.bootstrap_shared)
    ctx.database_dsn = target  # the collection step works in the same database
    if current is not None and current is not spec.isolation:
        await upgrade.run_upgrade(ctx, current, shared, target, password)
    elif spec.isolation is Isolation.POOL:
        await database.in_database(shared, lambda c: database.ensure_pool_tenant(c, spec.name))
    else:
        await database.in_database(
            target, lambda c: database.ensure_bridge_tenant(c, spec.name, password))
        # The shared registry row says where the tenant's data lives.
        await database.in_database(shared, lambda c: database.ensure_pool_tenant(
            c, spec.name, spec.isolation.value))
    await upgrade.finish_cleanup(ctx, shared)
    location = {Isolation.POOL: "shared", Isolation.BRIDGE: "schema",
                Isolation.SILO: "dedicated"}[spec.isolation]
    ctx.provisioned["databaseLocation"] = location
    ctx.provisioned["schema"] = (SHARED_SCHEMA if spec.isolation is Isolation.POOL
                                 else bridge_schema(spec.name))
    return Condition("DatabaseReady", True, "Provisioned",
                     f"{spec.isolation.value} tenant, schema {ctx.provisioned['schema']}")


async def ensure_collection(ctx: StepContext) -> Condition:
    rag = ctx.spec.rag
    if not rag.enabled:
        ctx.provisioned.pop("collectionTable", None)
        return Condition("CollectionReady", True, "Disabled", "RAG is disabled for this tenant")
    location: database.Location = "shared" if ctx.spec.isolation is Isolation.POOL else "schema"
    dsn = ctx.database_dsn or shared_dsn(ctx.settings)
    table = await database.in_database(dsn, lambda c: database.ensure_collection(
        c, ctx.spec.name, location, rag.embedding_dimensions, rag.hnsw.m,
        rag.hnsw.ef_construction, ctx.settings.pool_index_strategy))
    ctx.provisioned["collectionTable"] = table
    return Condition("CollectionReady", True, "Provisioned",
                     f"{table}, {rag.embedding_dimensions} dimensions, HNSW m={rag.hnsw.m}")


# --- Redis limits ------------------------------------------------------------------------------


async def ensure_limits(ctx: StepContext) -> Condition:
    if ctx.settings.redis_url is None:
        return Condition("LimitsReady", False, "NoRedisConfigured", "TENANTRY_REDIS_URL is not set")
    redis = Redis.from_url(ctx.settings.redis_url.get_secret_value())
    try:
        await write_limits(redis, ctx.spec)
    finally:
        await redis.aclose()
    ctx.provisioned["redisKeyPrefix"] = TenantKeys(ctx.spec.name).prefix
    return Condition("LimitsReady", True, "Written",
                     f"{ctx.spec.ai.requests_per_minute} rpm, "
                     f"{ctx.spec.ai.daily_tokens} tokens/day")


# --- runtime config ----------------------------------------------------------------------------


def runtime_config(spec: EffectiveSpec, namespace: str, provisioned: dict[str, str],
                   settings: OperatorSettings) -> TenantRuntimeConfig:
    """Pure: what the runtime needs to serve the tenant; names Secrets, never holds them."""
    location = provisioned.get("databaseLocation", "shared")
    # The revision grows with the generation and with each move of the data, so a config
    # written before an isolation switch never wins over one written after it.
    rank = {"shared": 0, "schema": 1, "dedicated": 2}[location]
    endpoint = spec.ai.endpoint
    return TenantRuntimeConfig(
        revision=spec.generation * 10 + rank,
        tenant=spec.name,
        isolation=spec.isolation.value,
        suspended=spec.suspended,
        model=spec.ai.model,
        max_tokens_per_request=spec.ai.max_tokens_per_request,
        endpoint=Endpoint(
            type="dedicated" if endpoint.type == "dedicated" else "shared",
            url=endpoint.url,
            secret_name=endpoint.secret_ref.name if endpoint.secret_ref else None,
            secret_key=endpoint.secret_ref.key if endpoint.secret_ref else None),
        database=DatabaseLocation(
            kind=location,
            schema_name=provisioned.get("schema", SHARED_SCHEMA),
            host=builders.silo_host(namespace) if location == "dedicated" else
            (settings.database_host_for_runtime if location == "schema" else None),
            database="tenantry",
            credentials_secret=provisioned.get("credentialsSecret")),
        collection=Collection(
            enabled=spec.rag.enabled, table=provisioned.get("collectionTable"),
            dimensions=spec.rag.embedding_dimensions, top_k=spec.rag.top_k,
            shared=location == "shared"),
        redis_key_prefix=TenantKeys(spec.name).prefix,
    )


async def ensure_runtime_config(ctx: StepContext) -> Condition:
    config = runtime_config(ctx.spec, ctx.namespace, ctx.provisioned, ctx.settings)
    await ctx.kube.apply(builders.runtime_configmap(ctx.namespace, ctx.spec.name,
                                                    config.model_dump_json(indent=2)))
    ctx.provisioned["configMap"] = "tenantry-runtime-config"
    return Condition("RuntimeConfigReady", True, "Applied", f"revision {config.revision}")
