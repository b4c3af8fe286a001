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
