"""Names and labels of everything provisioned for a tenant, derived in one place."""

from __future__ import annotations

from .model import GROUP

LABEL_TENANT = f"{GROUP}/tenant"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "tenantry-operator"
FIELD_MANAGER = "tenantry-operator"
# Set by hand on a Tenant to let its deletion skip cleanup that cannot reach its server.
ANNOTATION_FORCE_FINALIZE = f"{GROUP}/force-finalize"


def namespace_name(tenant: str, prefix: str = "tenant-") -> str:
    return f"{prefix}{tenant}"


def standard_labels(tenant: str, component: str) -> dict[str, str]:
    return {
        LABEL_TENANT: tenant,
        LABEL_MANAGED_BY: MANAGER,
        "app.kubernetes.io/part-of": "tenantry",
        "app.kubernetes.io/component": component,
    }


def owned_by(labels: dict[str, str] | None, tenant: str) -> bool:
    """True when an object carries the marks the operator puts on what it creates for `tenant`.

    Anything else (a namespace made by hand, another tenant's object) is never adopted or deleted.
    """
    labels = labels or {}
    return labels.get(LABEL_MANAGED_BY) == MANAGER and labels.get(LABEL_TENANT) == tenant
