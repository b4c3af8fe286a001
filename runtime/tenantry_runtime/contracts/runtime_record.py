"""The runtime's own copy of a tenant: one Secret per tenant in the runtime's namespace.

The operator writes it, the runtime's Kubernetes source (`kube_source.py`) lists and watches
the labelled Secrets of its own namespace (never cluster-wide) and hands each payload to the
store. Contract:

- name `tenantry-tenant-<tenant>`, in the runtime's namespace (`TENANTRY_RUNTIME_NAMESPACE` of
  the operator, `kube_namespace` of the runtime);
- labels `tenantry.dev/tenant=<tenant>` and `tenantry.dev/runtime-record=v1` (the selector);
- one data key `record.json`: the store's `TenantRecord` as JSON, secrets revealed: `config`
  (`TenantRuntimeConfig`, its revision only grows), `api_keys` ([{name, prefix, sha256,
  expires_at}], hashes only, never a key), `endpoint_api_key` (the dedicated endpoint's key,
  copied from the tenant's Secret), `database_dsn` (bridge/silo: the tenant role's login),
  `plan_tier` and `budget_fail_open` (the TenantPlan's `tier` and `budgets.failOpen`);
- annotation `tenantry.dev/api-keys-issued`: when each key was first written (admin CLI only);
- the Secret is deleted with its Tenant (both deletion policies): the runtime then forgets the
  tenant and its keys stop working.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

SECRET_PREFIX = "tenantry-tenant-"  # noqa: S105 - a name prefix, not a password
DATA_KEY = "record.json"
LABEL_TENANT = "tenantry.dev/tenant"
LABEL_RECORD = "tenantry.dev/runtime-record"
RECORD_VERSION = "v1"
SELECTOR = f"{LABEL_RECORD}={RECORD_VERSION}"
# JSON {key name: {prefix, at}}: when the operator first wrote each key into the record (its
# issue time, to the reconcile). Not read by the runtime; `tenantry keys list` shows it.
ANNOTATION_KEYS_ISSUED = "tenantry.dev/api-keys-issued"


def secret_name(tenant: str) -> str:
    return f"{SECRET_PREFIX}{tenant}"


def tenant_of(name: str) -> str | None:
    """The tenant a Secret name stands for, or None when it is not a record's name."""
    return name.removeprefix(SECRET_PREFIX) if name.startswith(SECRET_PREFIX) else None


def record_json(record: BaseModel) -> str:
    """The payload with its SecretStr fields revealed (pydantic masks them when dumping)."""
    data: dict[str, Any] = record.model_dump(mode="json")
    for name in type(record).model_fields:
        value = getattr(record, name)
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
