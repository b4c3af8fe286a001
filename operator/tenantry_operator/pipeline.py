"""The ordered list of reconcile steps; later steps rely on what earlier ones provisioned."""

from __future__ import annotations

from .api_keys import ensure_api_keys, ensure_runtime_record
from .dataplane import ensure_collection, ensure_database, ensure_limits, ensure_runtime_config
from .guardrails import ensure_guardrails
from .steps import Step, ensure_namespace


def reconcile_steps() -> list[Step]:
    return [ensure_namespace, ensure_guardrails, ensure_database, ensure_collection, ensure_limits,
            ensure_api_keys, ensure_runtime_config, ensure_runtime_record]
