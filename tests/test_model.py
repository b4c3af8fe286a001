"""Pure tests of the Tenant/TenantPlan model, the plan merge, conditions and builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tenantry_operator.builders import plan_settings, tenant_namespace, tenant_record
from tenantry_operator.conditions import Condition, merge_conditions, ready_condition
from tenantry_operator.dataplane import content_hash, next_revision, runtime_config
from tenantry_operator.model import (
    Isolation,
    PlanSpec,
    PlanViolation,
    TenantSpec,
    effective_spec,
)
from tenantry_operator.quotas import limits_of
from tenantry_operator.reconcile import phase_of
from tenantry_operator.settings import OperatorSettings
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.store import TenantRecord

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _docs(name: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((EXAMPLES / name).read_text())}


PLANS = {name: PlanSpec.model_validate(doc["spec"]) for name, doc in _docs("plans.yaml").items()}


def test_tenant_fields_override_the_plan_and_the_plan_fills_the_rest() -> None:
    globex = TenantSpec.from_body(_docs("tenants.yaml")["globex"]["spec"])
    spec = effective_spec("globex", "uid-1", 3, globex, PLANS["pro"])
    assert spec.ai.daily_tokens == 500_000  # the tenant's own
    assert spec.ai.monthly_tokens == 40_000_000  # from the plan
    assert spec.ai.model == "claude-sonnet-4-6"
    assert spec.ai.overage_allowed is True
    assert spec.rag.top_k == 8
    assert spec.isolation is Isolation.BRIDGE
    assert spec.billing.overage_price_per_million_tokens == "3.00"


def test_isolation_outside_the_plan_is_refused_with_a_clear_message() -> None:
    globex = TenantSpec.from_body({"planRef": {"name": "free"}, "isolation": "bridge"})
    with pytest.raises(PlanViolation, match="allows isolation pool; the Tenant asks for bridge"):
        effective_spec("globex", "uid", 1, globex, PLANS["free"])


def test_silo_example_parses_with_region_storage_and_dedicated_endpoint() -> None:
    silo = TenantSpec.from_body(_docs("tenant-silo.yaml")["initech"]["spec"])
    spec = effective_spec("initech", "uid", 1, silo, PLANS["enterprise"])
    assert spec.region == "eu-west"
    assert spec.database.storage is not None and spec.database.storage.size == "20Gi"
    assert spec.ai.endpoint.type == "dedicated"
    assert spec.ai.endpoint.secret_ref is not None
    assert spec.ai.endpoint.secret_ref.key == "api-key"
    assert spec.ai.requests_per_minute == 1000


def test_namespace_has_standard_labels_and_no_owner_reference() -> None:
    spec = effective_spec("acme", "uid-7", 1,
                          TenantSpec.from_body({"planRef": {"name": "free"}}), PLANS["free"])
    ns = tenant_namespace(spec, "tenant-")
    assert ns["metadata"]["name"] == "tenant-acme"
    assert ns["metadata"]["labels"]["tenantry.dev/tenant"] == "acme"
    assert ns["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tenantry-operator"
    # The finalizer decides the namespace's fate; a cascade through the GC must not.
    assert "ownerReferences" not in ns["metadata"]


def test_condition_transition_time_moves_only_when_status_changes() -> None:
    first = merge_conditions([], [Condition("NamespaceReady", False, "Pending")], 1, now="T1")
    same = merge_conditions(first, [Condition("NamespaceReady", False, "Still")], 2, now="T2")
    flipped = merge_conditions(same, [Condition("NamespaceReady", True, "Applied")], 3, now="T3")
    assert same[0]["lastTransitionTime"] == "T1"
    assert same[0]["reason"] == "Still" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "T3" and flipped[0]["status"] == "True"


def test_ready_summarises_the_first_failing_step() -> None:
    steps = [Condition("A", True, "Ok"), Condition("B", False, "Waiting", "pod not ready")]
    ready = ready_condition(steps)
    assert (ready.ok, ready.reason, ready.message) == (False, "Waiting", "B: pod not ready")
    assert ready_condition(steps[:1]).ok
    assert phase_of(None, [*steps, ready]) == "Provisioning"
    assert phase_of(None, [Condition("PlanResolved", False, "IsolationNotAllowed")]) == "Failed"


def _plan(**fields: Any) -> PlanSpec:
    return PlanSpec.model_validate({"model": "claude-haiku-4-5", **fields})


def test_the_plan_tier_and_budget_fail_open_reach_the_runtime_record() -> None:
    tenant = TenantSpec.from_body({"planRef": {"name": "p"}})
    config = runtime_config(effective_spec("acme", "u", 1, tenant, PLANS["free"]), "tenant-acme",
                            {}, OperatorSettings())
    tiers = {}
    for name, plan in PLANS.items():
        record = tenant_record(effective_spec("acme", "u", 1, tenant, plan), config, (), None, None)
        tiers[name] = record.plan_tier
        assert record.budget_fail_open is False  # no example plan takes that risk
    assert tiers == {"free": 0, "pro": 1, "enterprise": 2}
    risky = effective_spec("acme", "u", 1, tenant, _plan(tier=7, budgets={"failOpen": True},
                                                          maxConcurrentRequests=5))
    payload = json.loads(runtime_record.record_json(tenant_record(risky, config, (), None, None)))
    assert (payload["plan_tier"], payload["budget_fail_open"]) == (7, True)
    assert payload["max_concurrent_requests"] == 5
    # The runtime's store reads the same payload back.
    assert TenantRecord.model_validate(payload).plan_tier == 7


def test_a_plan_edit_of_tier_or_fail_open_changes_the_content_and_grows_the_revision() -> None:
    tenant = TenantSpec.from_body({"planRef": {"name": "p"}})
    settings = OperatorSettings()

    def digest(plan: PlanSpec) -> str:
        spec = effective_spec("acme", "u", 1, tenant, plan)
        config = runtime_config(spec, "tenant-acme", {}, settings)
        return content_hash(config, limits_of(spec, config.revision), plan_settings(spec))

    base = digest(_plan())
    assert digest(_plan()) == base
    assert digest(_plan(tier=1)) != base
    assert digest(_plan(budgets={"failOpen": True})) != base
    assert next_revision(10, digest(_plan(tier=1)), [(10, base)]) == 11
    assert next_revision(10, base, [(10, base)]) == 10
