"""Data-plane reconcile steps: database location, collection, Redis limits, runtime config."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from lightkube.resources.apps_v1 import StatefulSet
from lightkube.resources.core_v1 import ConfigMap, Namespace, PersistentVolumeClaim, Secret
from lightkube.resources.storage_v1 import StorageClass
from lightkube.types import PatchType
from lightkube.utils.quantity import parse_quantity
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
from .endpoint_reach import endpoint_problem
from .kube import Kube, as_dict
from .model import EffectiveSpec, Isolation
from .names import LABEL_MANAGED_BY, LABEL_TENANT, MANAGER, owned_by
from .quotas import limits_of, shared_client, write_limits
from .settings import OperatorSettings
from .steps import StepContext, StepFailed

log = logging.getLogger(__name__)


def shared_dsn(settings: OperatorSettings) -> str:
    if settings.database_url is None:
        raise StepFailed(Condition("DatabaseReady", False, "NoDatabaseConfigured",
                                   "TENANTRY_DATABASE_URL is not set"), retry_after=60)
    return settings.database_url.get_secret_value()


async def secret_value(kube: Kube, namespace: str, name: str, key: str) -> str | None:
    """A key of a Secret, from the watch-backed cache when it holds it (Kube.read: the
    operator's credential Secrets carry its label; one just applied is read back from the
    apply's response)."""
    obj = await kube.read(Secret, name, namespace)
    data = (obj.get("data") or {}) if obj is not None else {}
    return base64.b64decode(data[key]).decode() if key in data else None


async def ensure_credentials(ctx: StepContext, name: str, username: str, database_name: str,
                             host: str, lost_if_missing: bool = False) -> str:
    """The Secret is the source of truth for a password: generated once, never rotated here.

    A copy lives in the operator's own namespace; a Secret deleted by hand is restored from it
    with the same password. With both gone a new password is generated, unless
    `lost_if_missing` (a database that already knows the old one): then CredentialsLost.
    """
    backup_ns = ctx.settings.credentials_namespace
    backup_name = builders.credentials_backup_name(ctx.spec.name, name)
    password = await secret_value(ctx.kube, ctx.namespace, name, "password")
    if password is None:
        password = await backup_password(ctx.kube, backup_ns, ctx.spec.name, name)
    if password is None:
        if lost_if_missing:
            raise StepFailed(Condition("DatabaseReady", False, "CredentialsLost",
                                       credentials_lost_message(ctx, name, backup_name, host)),
                             retry_after=60)
        password = secrets.token_urlsafe(24)
    secret = builders.credentials_secret(ctx.spec, ctx.namespace, name, username, password,
                                         database_name, host)
    # The copy first: a crash in between never leaves a Secret that has no copy.
    await ensure_own_namespace(ctx.kube, backup_ns)
    await ctx.kube.apply(builders.credentials_backup(ctx.spec, backup_ns, name,
                                                     secret["stringData"]))
    await ctx.kube.apply(secret)
    return password


async def backup_password(kube: Kube, namespace: str, tenant: str, secret: str) -> str | None:
    """The password kept in the operator's copy of `secret`; the copy's former name is read
    too, but only when it carries the tenant's marks and names this credential."""
    for name in (builders.credentials_backup_name(tenant, secret),
                 builders.legacy_credentials_backup_name(tenant, secret)):
        obj = await kube.read(Secret, name, namespace)
        if obj is None:
            continue
        labels = obj["metadata"].get("labels") or {}
        if not owned_by(labels, tenant) or labels.get(builders.CREDENTIAL_LABEL) != secret:
            continue
        data = obj.get("data") or {}
        if "password" in data:
            return base64.b64decode(data["password"]).decode()
    return None


async def ensure_own_namespace(kube: Kube, name: str) -> None:
    """The chart installs the operator's and the runtime's namespaces; an operator run by hand
    may not have them yet."""
    if await kube.read(Namespace, name) is None:
        await kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {LABEL_MANAGED_BY: MANAGER}}})


def credentials_lost_message(ctx: StepContext, name: str, backup_name: str, host: str) -> str:
    ns, tenant = ctx.namespace, ctx.spec.name
    pod = f"{builders.SILO_NAME}-0"
    return (
        f"Secret {ns}/{name} and its copy {ctx.settings.credentials_namespace}/{backup_name} are"
        " both gone, but the silo's data directory exists and keeps the admin password it was"
        " initialised with; a new password would never reach it, so none is generated. To"
        " recover, set a new password inside the silo over its local socket, then recreate the"
        f" Secret with it: kubectl exec -n {ns} {pod} -- psql -U postgres -d"
        f" {builders.SILO_DATABASE} -c \"ALTER ROLE postgres PASSWORD '<new-password>'\" ;"
        f" kubectl create secret generic {name} -n {ns} --type=kubernetes.io/basic-auth"
        " --from-literal=username=postgres --from-literal=password='<new-password>'"
        f" --from-literal=database={builders.SILO_DATABASE} --from-literal=host={host} ;"
        f" kubectl label secret {name} -n {ns} {LABEL_MANAGED_BY}={MANAGER}"
        f" {LABEL_TENANT}={tenant}. The operator then keeps a copy again.")


# --- silo --------------------------------------------------------------------------------------


async def silo_claims(kube: Kube, tenant: str, namespace: str) -> list[dict[str, Any]]:
    """The silo StatefulSet's volume claims that carry the tenant's marks."""
    selector: dict[str, Any] = dict(builders.silo_selector(tenant))
    claims = kube.client.list(PersistentVolumeClaim, namespace=namespace, labels=selector)
    return [claim for claim in [as_dict(c) async for c in claims]
            if owned_by(claim["metadata"].get("labels"), tenant)]


async def ensure_silo_server(ctx: StepContext) -> str:
    """Apply the silo's objects; return its admin DSN once its Pod is Ready."""
    ns, spec = ctx.namespace, ctx.spec
    host = builders.silo_host(ns)
    live = await ctx.kube.get(StatefulSet, builders.SILO_NAME, ns)
    claims = await silo_claims(ctx.kube, spec.name, ns)
    # POSTGRES_PASSWORD reaches a data directory only at initdb: once the silo may hold data,
    # a lost admin password must never be replaced by a new one.
    has_data = live is not None or bool(claims) or "statefulSet" in ctx.provisioned
    await ensure_credentials(ctx, builders.SILO_ADMIN_SECRET, "postgres",
                             builders.SILO_DATABASE, host, lost_if_missing=has_data)
    templates = ((as_dict(live).get("spec") or {}).get("volumeClaimTemplates") or [{}]
                 if live is not None else [{}])
    for manifest in builders.silo_services(spec, ns):
        await ctx.kube.apply(manifest)
    # The StatefulSet as read above, or as the apply answered: its status, with no second read.
    sts = await ctx.kube.apply(builders.silo_statefulset(spec, ns, ctx.settings.silo_image,
                                                         templates[0].get("spec")), live=live)
    await ctx.kube.apply(builders.silo_disruption_budget(spec, ns))
    ctx.provisioned["statefulSet"] = builders.SILO_NAME
    await ensure_volume_size(ctx, claims)
    ready = int((as_dict(sts).get("status") or {}).get("readyReplicas") or 0)
    if ready < 1:
        raise StepFailed(Condition("DatabaseReady", False, "WaitingForSiloPod",
                                   f"StatefulSet {ns}/{builders.SILO_NAME} has no Ready Pod yet"),
                         retry_after=3)
    return await silo_dsn(ctx.kube, ctx.settings, spec.name, ns)


def _quantity(size: str) -> Decimal:
    value = parse_quantity(size)
    if value is None:
        raise ValueError(f"not a quantity: {size!r}")
    return value


def _claim_size(claim: dict[str, Any]) -> str:
    size: str = claim["spec"]["resources"]["requests"]["storage"]
    return size


async def ensure_volume_size(ctx: StepContext, claims: list[dict[str, Any]]) -> None:
    """Grow the silo's claims to spec.database.storage.size.

    The StatefulSet's claim template is immutable (it keeps the size it was created with), so
    a larger size is requested on each claim; the StorageClass must allow expansion.
    """
    storage = ctx.spec.database.storage
    if storage is None:
        return
    wanted = _quantity(storage.size)
    for claim in claims:
        name, current = claim["metadata"]["name"], _claim_size(claim)
        where = f"{ctx.namespace}/{name}"
        if wanted < _quantity(current):
            raise StepFailed(Condition(
                "DatabaseReady", False, "VolumeShrinkNotSupported",
                f"spec.database.storage.size is {storage.size} but claim {where} already holds"
                f" {current}; volumes cannot shrink. Set the size back to {current} or more"),
                retry_after=60)
        if wanted == _quantity(current):
            continue
        class_name = claim["spec"].get("storageClassName")
        storage_class = (await ctx.kube.get(StorageClass, class_name)
                         if class_name else None)
        if storage_class is None or not as_dict(storage_class).get("allowVolumeExpansion"):
            raise StepFailed(Condition(
                "DatabaseReady", False, "VolumeExpansionNotAllowed",
                f"spec.database.storage.size asks for {storage.size}, but StorageClass"
                f" {class_name or '(none)'} of claim {where} does not allow volume expansion;"
                f" the claim stays at {current}. Set allowVolumeExpansion: true on the"
                f" StorageClass, or set the size back to {current}"), retry_after=60)
        await ctx.kube.client.patch(
            PersistentVolumeClaim, name,
            {"spec": {"resources": {"requests": {"storage": storage.size}}}},
            namespace=ctx.namespace, patch_type=PatchType.MERGE)
        log.info("tenant %s: claim %s resized from %s to %s", ctx.spec.name, where, current,
                 storage.size)


async def silo_dsn(kube: Kube, settings: OperatorSettings, tenant: str, namespace: str) -> str:
    """Admin DSN of a silo: the override when set (operator outside the cluster), else the
    client Service with the password from the silo's admin Secret."""
    override = settings.silo_dsn_overrides.get(tenant)
    if override:
        return override
    password = await secret_value(kube, namespace, builders.SILO_ADMIN_SECRET, "password")
    if password is None:
        raise RuntimeError(f"Secret {namespace}/{builders.SILO_ADMIN_SECRET} has no password")
    return builders.silo_admin_dsn(namespace, password)


# --- database location -------------------------------------------------------------------------


async def ensure_database(ctx: StepContext) -> Condition:
    """Provision the tenant at its isolation level; raise it in place when the spec asks."""
    spec, shared = ctx.spec, shared_dsn(ctx.settings)
    if spec.isolation is Isolation.POOL and not upgrade.cleanup_pending(ctx):
        await ensure_pool_database(ctx, shared)
        return database_ready(ctx)
    current = await database.in_database(shared, lambda c: upgrade.current_isolation(c, spec.name))
    stop_if_lowered(spec, current)
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
    return database_ready(ctx)


def stop_if_lowered(spec: EffectiveSpec, current: Isolation | None) -> None:
    """Stop when the registry records a higher isolation: going on would provision a lower
    location and a config pointing at it while the data stays where the registry says."""
    if current is None or current.rank <= spec.isolation.rank:
        return
    raise StepFailed(Condition(
        "DatabaseReady", False, "IsolationLowered",
        f"the data of tenant {spec.name} lives at isolation {current.value} (registry row in"
        f" {SHARED_SCHEMA}.tenants, e.g. kept by deletionPolicy Retain from an earlier Tenant"
        f" of this name); lowering it to {spec.isolation.value} is not supported and nothing"
        f" was provisioned. Set spec.isolation to {current.value} (or higher) to take the"
        " data back, or remove the retained data first (delete a Tenant of this name at"
        f" isolation {current.value} with deletionPolicy Delete)"), retry_after=60)


async def ensure_pool_database(ctx: StepContext, shared: str) -> None:
    """A pool tenant's registry row, and its collection for ensure_collection, in one pool
    checkout: one read-only query when settled (bench/README.md, operator_scale)."""
    spec, rag = ctx.spec, ctx.spec.rag
    request = (database.CollectionRequest(rag.embedding_dimensions, rag.hnsw.m,
                                          rag.hnsw.ef_construction,
                                          ctx.settings.pool_index_strategy)
               if rag.enabled else None)
    found = await database.in_database(
        shared, lambda c: database.provision_pool_tenant(c, spec.name, request))
    stop_if_lowered(spec, Isolation(found.recorded) if found.recorded else None)
    ctx.pool_collection = found.collection


def database_ready(ctx: StepContext) -> Condition:
    spec = ctx.spec
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
    if isinstance(ctx.pool_collection, Exception):
        raise ctx.pool_collection
    table = ctx.pool_collection  # made by ensure_pool_database on its connection
    if table is None:
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
    revision = await settle_revision(ctx)
    await write_limits(shared_client(ctx.settings.redis_url.get_secret_value()), ctx.spec,
                       revision)
    ctx.provisioned["redisKeyPrefix"] = TenantKeys(ctx.spec.name).prefix
    return Condition("LimitsReady", True, "Written",
                     f"{ctx.spec.ai.requests_per_minute} rpm, "
                     f"{ctx.spec.ai.daily_tokens} tokens/day")


# --- runtime config ----------------------------------------------------------------------------


def runtime_config(spec: EffectiveSpec, namespace: str, provisioned: dict[str, str],
                   settings: OperatorSettings) -> TenantRuntimeConfig:
    """Pure: what the runtime needs to serve the tenant; names Secrets, never holds them."""
    location = provisioned.get("databaseLocation", "shared")
    # The base revision grows with the generation and with each move of the data, so a config
    # written before an isolation switch never wins over one written after it; settle_revision
    # raises it further whenever the content changes.
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


def content_hash(config: TenantRuntimeConfig, limits: dict[str, str],
                 plan_settings: Mapping[str, Any]) -> str:
    """Pure: a digest of everything the runtime reads (config, limits and the record's plan
    settings), revisions aside, so a TenantPlan edit of any of them grows the revision."""
    content = [config.model_dump(mode="json", exclude={"revision"}),
               {k: v for k, v in limits.items() if k != "revision"}, dict(plan_settings)]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def next_revision(base: int, content: str, recorded: list[tuple[int, str | None]]) -> int:
    """Pure: the revision for `content`. It grows whenever the content differs from the last
    recorded one (a TenantPlan edit changes it without a new generation), never otherwise,
    and is at least `base` (generation * 10 + location rank)."""
    last = max((revision for revision, _ in recorded), default=0)
    same = bool(recorded) and recorded[0][1] == content
    return max(base, last if same else last + 1)


async def settle_revision(ctx: StepContext) -> int:
    """Once per reconcile: the revision shared by the runtime config and the Redis limits.

    The live ConfigMap (revision and hash annotation) is the record, status.runtimeConfig the
    fallback when the ConfigMap was deleted.
    """
    if ctx.config_revision is not None:
        return ctx.config_revision
    config = runtime_config(ctx.spec, ctx.namespace, ctx.provisioned, ctx.settings)
    digest = content_hash(config, limits_of(ctx.spec, config.revision),
                          builders.plan_settings(ctx.spec))
    recorded: list[tuple[int, str | None]] = []
    live = ctx.live_config_map = await ctx.live(ConfigMap, builders.RUNTIME_CONFIGMAP)
    if live is not None and owned_by(as_dict(live)["metadata"].get("labels"), ctx.spec.name):
        live_dict = as_dict(live)
        try:
            live_revision = int(json.loads(live_dict["data"]["config.json"])["revision"])
        except (KeyError, TypeError, ValueError):
            live_revision = None
        if live_revision is not None:
            recorded.append((live_revision, (live_dict["metadata"].get("annotations") or {})
                             .get(builders.CONFIG_HASH_ANNOTATION)))
    status = ctx.status.get("runtimeConfig") or {}
    if "revision" in status:
        recorded.append((int(status["revision"]), status.get("hash")))
    ctx.config_revision = next_revision(config.revision, digest, recorded)
    ctx.status_updates["runtimeConfig"] = {"revision": ctx.config_revision, "hash": digest}
    return ctx.config_revision


async def settled_config(ctx: StepContext) -> tuple[TenantRuntimeConfig, str]:
    """The runtime config at the settled revision, and its content hash."""
    revision = await settle_revision(ctx)
    config = runtime_config(ctx.spec, ctx.namespace, ctx.provisioned, ctx.settings)
    digest = content_hash(config, limits_of(ctx.spec, revision), builders.plan_settings(ctx.spec))
    return config.model_copy(update={"revision": revision}), digest


async def ensure_runtime_config(ctx: StepContext) -> Condition:
    endpoint = ctx.spec.ai.endpoint
    settings = ctx.settings
    problem = endpoint.url and endpoint_problem(
        endpoint.url, ctx.namespace, settings.namespace_prefix,
        (settings.runtime_namespace, settings.credentials_namespace), settings.cluster_cidrs)
    if problem:  # before the config: the runtime keeps the endpoint it was last given
        raise StepFailed(Condition("RuntimeConfigReady", False, "EndpointNotAllowed",
                                   f"spec.ai.endpoint.url: {problem}"), retry_after=60)
    config, digest = await settled_config(ctx)
    await ctx.kube.apply(builders.runtime_configmap(ctx.namespace, ctx.spec.name,
                                                    config.model_dump_json(indent=2), digest),
                         live=ctx.live_config_map)
    ctx.provisioned["configMap"] = builders.RUNTIME_CONFIGMAP
    return Condition("RuntimeConfigReady", True, "Applied", f"revision {config.revision}")
