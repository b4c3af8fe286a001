"""What the operator's caches hold of tenant namespaces: only the objects it writes there.

The caches select by the operator's managed-by label, which anyone who may create an object
can also set. A tenant allowed to create Secrets or ConfigMaps in its namespace (most are)
could label thousands of large ones and so fill the operator's memory, which serves every
tenant. In a tenant's namespace the caches therefore keep only the names the operator writes
there; a read of any other name goes to the API server, as for an unlabelled object.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from lightkube.resources.core_v1 import (
    ConfigMap,
    LimitRange,
    ResourceQuota,
    Secret,
    ServiceAccount,
)
from lightkube.resources.networking_v1 import NetworkPolicy

from . import builders, guardrails

NAMES_IN_TENANT_NAMESPACES: dict[Any, frozenset[str]] = {
    Secret: frozenset({builders.TENANT_DB_SECRET, builders.SILO_ADMIN_SECRET,
                       builders.API_KEYS_SECRET}),
    ConfigMap: frozenset({builders.RUNTIME_CONFIGMAP}),
    ResourceQuota: frozenset({guardrails.QUOTA_NAME}),
    LimitRange: frozenset({guardrails.LIMIT_RANGE_NAME}),
    NetworkPolicy: frozenset({guardrails.POLICY_DEFAULT_DENY, guardrails.POLICY_DNS,
                              guardrails.POLICY_WORKLOADS, guardrails.POLICY_SILO_DATABASE}),
    ServiceAccount: frozenset({guardrails.SERVICE_ACCOUNT_NAME}),
}


def tenant_namespace_scope(namespace_prefix: str, platform_namespaces: Collection[str]
                           ) -> Callable[[Any, str | None, str], bool]:
    """`keep(kind, namespace, name)` for Kube.start_caches: in a namespace with the tenant
    prefix (the platform's own excepted), only the names of NAMES_IN_TENANT_NAMESPACES."""

    def keep(kind: Any, namespace: str | None, name: str) -> bool:
        names = NAMES_IN_TENANT_NAMESPACES.get(kind)
        if names is None or namespace is None or namespace in platform_namespaces:
            return True
        return not namespace.startswith(namespace_prefix) or name in names

    return keep
