"""Pure builders: effective spec in, desired Kubernetes manifests out. No I/O here."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from psycopg.conninfo import make_conninfo
from pydantic import SecretStr
from tenantry_runtime.api_keys import ApiKeyRecord, prefix_of
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.runtime_config import TenantRuntimeConfig
from tenantry_runtime.store import TenantRecord

from .model import GROUP, EffectiveSpec
from .names import LABEL_TENANT, namespace_name, standard_labels

Manifest = dict[str, Any]


def tenant_namespace(spec: EffectiveSpec, prefix: str) -> Manifest:
    """No owner reference: the garbage collector would delete the namespace (Secrets, silo
    volumes) on a foreground or background cascade before the finalizer could apply Retain.
    The finalizer deletes it itself under deletionPolicy Delete."""
    labels = standard_labels(spec.name, "namespace")
    labels.update({
        f"{GROUP}/isolation": spec.isolation.value,
        f"{GROUP}/plan": spec.plan,
        # Pod Security Admission: tenant workloads run restricted.
        "pod-security.kubernetes.io/enforce": "restricted",
    })
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace_name(spec.name, prefix),
            "labels": labels,
        },
    }


def namespace_selector(tenant: str) -> dict[str, Any]:
    return {"matchLabels": {LABEL_TENANT: tenant}}


# --- silo: a dedicated Postgres per tenant ----------------------------------------------------

SILO_NAME = "postgres"
SILO_ADMIN_SECRET = "postgres-admin"  # noqa: S105 - a Secret's name, not a password
TENANT_DB_SECRET = "tenant-db-credentials"  # noqa: S105
SILO_DATABASE = "tenantry"
SILO_PORT = 5432
CREDENTIAL_LABEL = f"{GROUP}/credential"


def _silo_labels(tenant: str) -> dict[str, str]:
    return {**standard_labels(tenant, "silo-database"), "app.kubernetes.io/name": SILO_NAME}


def silo_selector(tenant: str) -> dict[str, str]:
    # Selector labels never change after creation (StatefulSet selectors are immutable).
    return {"app.kubernetes.io/name": SILO_NAME, LABEL_TENANT: tenant}


def credentials_secret(spec: EffectiveSpec, namespace: str, name: str, username: str,
                       password: str, database: str, host: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": standard_labels(spec.name, "credentials")},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": username, "password": password, "database": database,
                       "host": host},
    }


def credentials_backup_name(tenant: str, secret: str) -> str:
    """The operator's own copy of a generated credential, in its own namespace.

    The dot keeps names apart: tenant ids have none, so `<tenant>.` ends where the id ends
    (with hyphens in ids, `tenantry-<tenant>-<secret>` of tenant `tenant` was also the runtime
    record `tenantry-tenant-<id>` of tenant `postgres-admin`, in what is by default the same
    namespace).
    """
    return f"tenantry-{tenant}.{secret}"


def legacy_credentials_backup_name(tenant: str, secret: str) -> str:
    """The copy's name before tenant ids took hyphens; read (when it carries the tenant's
    marks) and deleted, never written."""
    return f"tenantry-{tenant}-{secret}"


def credentials_backup(spec: EffectiveSpec, namespace: str, secret: str,
                       data: dict[str, str]) -> Manifest:
    """A copy of a tenant's credential Secret: a Secret deleted by hand is restored from it,
    because a silo's data directory learns its admin password only once, at initdb."""
    labels = standard_labels(spec.name, "credentials-backup")
    labels[CREDENTIAL_LABEL] = secret
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": credentials_backup_name(spec.name, secret), "namespace": namespace,
                     "labels": labels},
        "type": "Opaque",
        "stringData": data,
    }


def silo_services(spec: EffectiveSpec, namespace: str) -> list[Manifest]:
    """A headless Service for the StatefulSet's stable identity, and a client Service."""
    port = [{"name": "postgres", "port": SILO_PORT, "targetPort": "postgres"}]
    base = {"apiVersion": "v1", "kind": "Service"}
    return [
        {**base, "metadata": {"name": f"{SILO_NAME}-hl", "namespace": namespace,
                              "labels": _silo_labels(spec.name)},
         "spec": {"clusterIP": "None", "selector": silo_selector(spec.name), "ports": port,
                  "publishNotReadyAddresses": True}},
        {**base, "metadata": {"name": SILO_NAME, "namespace": namespace,
                              "labels": _silo_labels(spec.name)},
         "spec": {"type": "ClusterIP", "selector": silo_selector(spec.name), "ports": port}},
    ]


def silo_statefulset(spec: EffectiveSpec, namespace: str, image: str,
                     live_claim: dict[str, Any] | None = None) -> Manifest:
    """`live_claim`: the claim template spec of the live StatefulSet. Claim templates are
    immutable, so its size and class are kept; a larger spec size resizes the claims instead."""
    storage = spec.database.storage
    if storage is None:  # the CRD requires it for silo; guard against an old object
        raise ValueError("silo isolation needs spec.database.storage")
    live = live_claim or {}
    size = ((live.get("resources") or {}).get("requests") or {}).get("storage") or storage.size
    storage_class = live.get("storageClassName") if live_claim else storage.storage_class_name
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": size}}}
    if storage_class:
        claim_spec["storageClassName"] = storage_class
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999,
                            "fsGroup": 999, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "postgres",
            "image": image,
            "ports": [{"name": "postgres", "containerPort": SILO_PORT}],
            "env": [
                {"name": "POSTGRES_USER", "valueFrom": {"secretKeyRef": {
                    "name": SILO_ADMIN_SECRET, "key": "username"}}},
                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {
                    "name": SILO_ADMIN_SECRET, "key": "password"}}},
                {"name": "POSTGRES_DB", "value": SILO_DATABASE},
                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
            ],
            "resources": spec.database.resources,
            "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "postgres"]},
                               "periodSeconds": 5},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                             {"name": "run", "mountPath": "/var/run/postgresql"}],
        }],
        "volumes": [{"name": "run", "emptyDir": {}}],
    }
    if spec.region:
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "topology.kubernetes.io/region", "operator": "In",
                "values": [spec.region]}]}]}}}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": SILO_NAME, "namespace": namespace, "labels": _silo_labels(spec.name)},
        "spec": {
            "serviceName": f"{SILO_NAME}-hl",
            "replicas": 1,
            "selector": {"matchLabels": silo_selector(spec.name)},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain",
                                                     "whenScaled": "Retain"},
            "template": {"metadata": {"labels": _silo_labels(spec.name)}, "spec": pod_spec},
            "volumeClaimTemplates": [{"metadata": {"name": "data",
                                                   "labels": _silo_labels(spec.name)},
                                      "spec": claim_spec}],
        },
    }


def silo_disruption_budget(spec: EffectiveSpec, namespace: str) -> Manifest:
    """One replica: voluntary evictions (drains) must wait for an operator-led move."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": SILO_NAME, "namespace": namespace, "labels": _silo_labels(spec.name)},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": silo_selector(spec.name)}},
    }


def silo_host(namespace: str) -> str:
    return f"{SILO_NAME}.{namespace}.svc:{SILO_PORT}"


def silo_admin_dsn(namespace: str, password: str) -> str:
    """The operator's admin DSN of a silo, through its client Service.

    The Service selects Pods by labels that any Pod of the tenant's namespace may carry, so
    the server behind it may be the tenant's: require_auth lets only SCRAM through, which
    never sends the password and fails unless the server knows its verifier (libpq would
    otherwise send it in clear text to a server that asks).
    """
    return make_conninfo("", host=silo_host(namespace).split(":")[0], port=str(SILO_PORT),
                         user="postgres", password=password, dbname=SILO_DATABASE,
                         require_auth="scram-sha-256")


RUNTIME_CONFIGMAP = "tenantry-runtime-config"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"


def runtime_configmap(namespace: str, tenant: str, config_json: str,
                      content_hash: str) -> Manifest:
    """`content_hash` covers everything but the revision: the next render compares it to decide
    whether the revision must grow."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": RUNTIME_CONFIGMAP, "namespace": namespace,
                     "labels": standard_labels(tenant, "runtime-config"),
                     "annotations": {CONFIG_HASH_ANNOTATION: content_hash}},
        "data": {"config.json": config_json},
    }


# --- API keys and the runtime's copy of a tenant (docs/api-keys.md) -----------------------------

API_KEYS_SECRET = "tenantry-api-keys"  # noqa: S105 - a Secret's name, not a password


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def api_keys_secret(tenant: str, namespace: str, keys: Mapping[str, str]) -> Manifest:
    """The plaintext keys, one data key per name: the only place a key is ever written.

    `data` (not `stringData`): server-side apply then removes the entry of a removed name."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": API_KEYS_SECRET, "namespace": namespace,
                     "labels": standard_labels(tenant, "api-keys")},
        "type": "Opaque",
        "data": {name: _b64(key) for name, key in sorted(keys.items())},
    }


def issue_api_keys(wanted: Iterable[str], existing: Mapping[str, str],
                   generate: Callable[[], str]) -> tuple[dict[str, str], list[str]]:
    """(key per wanted name, names that got a new key). An existing well-formed key is kept
    as it is, whatever else changes; a missing or malformed one is generated."""
    keys: dict[str, str] = {}
    issued: list[str] = []
    for name in wanted:
        current = existing.get(name)
        if current is not None and prefix_of(current) is not None:
            keys[name] = current
        else:
            keys[name] = generate()
            issued.append(name)
    return keys, issued


def plan_settings(spec: EffectiveSpec) -> dict[str, Any]:
    """The plan's settings the runtime reads from the tenant record (not the config contract)."""
    return {"plan_tier": spec.ai.plan_tier, "budget_fail_open": spec.ai.budget_fail_open,
            "max_concurrent_requests": spec.ai.max_concurrent_requests}


def tenant_record(spec: EffectiveSpec, config: TenantRuntimeConfig,
                   api_keys: Iterable[ApiKeyRecord], endpoint_api_key: str | None,
                   database_dsn: str | None) -> TenantRecord:
    """Pure: the runtime's copy of the tenant (the payload of `runtime_record_secret`)."""
    return TenantRecord(config=config, api_keys=tuple(api_keys),
                        endpoint_api_key=SecretStr(endpoint_api_key) if endpoint_api_key else None,
                        database_dsn=SecretStr(database_dsn) if database_dsn else None,
                        **plan_settings(spec))


def runtime_record_secret(tenant: str, namespace: str, payload: str,
                          keys_issued: Mapping[str, Mapping[str, str]] | None = None
                          ) -> Manifest:
    """The runtime's copy of the tenant (contracts/runtime_record.py), in its own namespace.

    `keys_issued` (billing area, `key_issue_times`) goes into an annotation the runtime
    ignores: when each key was first seen, for `tenantry keys list`."""
    labels = standard_labels(tenant, "runtime-record")
    labels[runtime_record.LABEL_RECORD] = runtime_record.RECORD_VERSION
    metadata: dict[str, Any] = {"name": runtime_record.secret_name(tenant),
                                "namespace": namespace, "labels": labels}
    if keys_issued is not None:
        metadata["annotations"] = {runtime_record.ANNOTATION_KEYS_ISSUED: json.dumps(
            keys_issued, sort_keys=True, separators=(",", ":"))}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": {runtime_record.DATA_KEY: _b64(payload)},
    }


def key_issue_times(live: Mapping[str, Any] | None, keys: Iterable[ApiKeyRecord],
                    now: str) -> dict[str, dict[str, str]]:
    """Pure: {name: {prefix, at}}: the live annotation's time for a key with the same name and
    prefix (the same key), `now` for a new or re-issued one."""
    raw = (((live or {}).get("metadata") or {}).get("annotations") or {}).get(
        runtime_record.ANNOTATION_KEYS_ISSUED)
    try:
        known = json.loads(raw) if raw else {}
    except ValueError:
        known = {}
    known = known if isinstance(known, dict) else {}
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        seen = known.get(key.name)
        at = seen.get("at") if isinstance(seen, dict) and seen.get("prefix") == key.prefix \
            else None
        out[key.name] = {"prefix": key.prefix, "at": str(at) if at else now}
    return out


def login_dsn(credentials: Mapping[str, str]) -> str:
    """A libpq DSN from a credentials Secret's fields (`host` may carry `:port`); every value
    quoted by psycopg, so a password never breaks out of its field."""
    host, _, port = credentials["host"].partition(":")
    return make_conninfo("", host=host, port=port or "5432", user=credentials["username"],
                         password=credentials["password"], dbname=credentials["database"])


def secret_differs(live: Mapping[str, Any] | None, manifest: Manifest) -> bool:
    """Whether applying `manifest` would change the live Secret (its data, type or labels)."""
    if live is None:
        return True
    labels = live.get("metadata", {}).get("labels") or {}
    annotations = live.get("metadata", {}).get("annotations") or {}
    return ((live.get("data") or {}) != manifest["data"] or live.get("type") != manifest["type"]
            or any(labels.get(k) != v for k, v in manifest["metadata"]["labels"].items())
            or any(annotations.get(k) != v
                   for k, v in (manifest["metadata"].get("annotations") or {}).items()))
