"""Pure builders: effective spec in, desired Kubernetes manifests out. No I/O here."""

from __future__ import annotations

from typing import Any

from .model import GROUP, VERSION, EffectiveSpec
from .names import LABEL_TENANT, namespace_name, standard_labels

Manifest = dict[str, Any]


def owner_reference(spec: EffectiveSpec) -> dict[str, Any]:
    """Links a cluster-scoped child (the Namespace) back to its Tenant."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def tenant_namespace(spec: EffectiveSpec, prefix: str) -> Manifest:
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
            "ownerReferences": [owner_reference(spec)],
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


def _silo_labels(tenant: str) -> dict[str, str]:
    return {**standard_labels(tenant, "silo-database"), "app.kubernetes.io/name": SILO_NAME}


def _silo_selector(tenant: str) -> dict[str, str]:
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


def silo_services(spec: EffectiveSpec, namespace: str) -> list[Manifest]:
    """A headless Service for the StatefulSet's stable identity, and a client Service."""
    port = [{"name": "postgres", "port": SILO_PORT, "targetPort": "postgres"}]
    base = {"apiVersion": "v1", "kind": "Service"}
    return [
        {**base, "metadata": {"name": f"{SILO_NAME}-hl", "namespace": namespace,
                              "labels": _silo_labels(spec.name)},
         "spec": {"clusterIP": "None", "selector": _silo_selector(spec.name), "ports": port,
                  "publishNotReadyAddresses": True}},
        {**base, "metadata": {"name": SILO_NAME, "namespace": namespace,
                              "labels": _silo_labels(spec.name)},
         "spec": {"type": "ClusterIP", "selector": _silo_selector(spec.name), "ports": port}},
    ]


def silo_statefulset(spec: EffectiveSpec, namespace: str, image: str) -> Manifest:
    storage = spec.database.storage
    if storage is None:  # the CRD requires it for silo; guard against an old object
        raise ValueError("silo isolation needs spec.database.storage")
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": storage.size}}}
    if storage.storage_class_name:
        claim_spec["storageClassName"] = storage.storage_class_name
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
            "selector": {"matchLabels": _silo_selector(spec.name)},
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
        "spec": {"minAvailable": 1, "selector": {"matchLabels": _silo_selector(spec.name)}},
    }


def silo_host(namespace: str) -> str:
    return f"{SILO_NAME}.{namespace}.svc:{SILO_PORT}"


def runtime_configmap(namespace: str, tenant: str, config_json: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tenantry-runtime-config", "namespace": namespace,
                     "labels": standard_labels(tenant, "runtime-config")},
        "data": {"config.json": config_json},
    }
