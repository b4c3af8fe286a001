"""Names and labels of everything provisioned for a tenant, derived in one place."""

from __future__ import annotations

from .model import GROUP

LABEL_TENANT = f"{GROUP}/tenant"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "tenantry-operator"
FIELD_MANAGER = "tenantry-operator"


def namespace_name(tenant: str, prefix: str = "tenant-") -> str:
    return f"{prefix}{tenant}"


def standard_labels(tenant: str, component: str) -> dict[str, str]:
    return {
        LABEL_TENANT: tenant,
        LABEL_MANAGED_BY: MANAGER,
        "app.kubernetes.io/part-of": "tenantry",
        "app.kubernetes.io/component": component,
    }
