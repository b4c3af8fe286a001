"""Guardrails of tenant namespaces (quota, limits, ServiceAccount) and the invalid combinations
the CRD cannot see: the pure builders, then the operator against the real control plane.

The network policies themselves are evaluated by an analyzer in test_network_policies.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kube_helpers import (
    apply_tenant,
    condition,
    delete_tenant,
    get_json,
    tenant_status,
    wait_for,
    wait_ready,
)
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator import guardrails
from tenantry_operator.conditions import Condition, transitions
from tenantry_operator.model import PlanSpec, PlanViolation, TenantSpec, effective_spec
from tenantry_operator.reconcile import phase_of

PLAN = PlanSpec.model_validate({"model": "claude-haiku-4-5",
                                "allowedIsolation": ["pool", "silo"]})


def spec_of(plan: PlanSpec = PLAN, **tenant: Any) -> Any:
    return effective_spec("acme", "uid", 1, TenantSpec.from_body(
        {"planRef": {"name": "p"}, **tenant}), plan)


def hard(spec: Any) -> dict[str, str]:
    quota: dict[str, str] = guardrails.resource_quota(spec, "tenant-acme")["spec"]["hard"]
    return quota


# --- pure builders ------------------------------------------------------------------------------


def test_pool_tenant_quota_and_limits_are_the_plans_defaults() -> None:
    spec = spec_of()
    assert hard(spec) == {
        "limits.cpu": "4", "limits.memory": "8Gi", "persistentvolumeclaims": "5", "pods": "20",
        "requests.cpu": "2", "requests.memory": "4Gi", "requests.storage": "20Gi",
        "services": "10", "services.loadbalancers": "0", "services.nodeports": "0"}
    limits = guardrails.limit_range(spec, "tenant-acme")["spec"]["limits"]
    assert limits == [{"type": "Container", "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                       "default": {"cpu": "500m", "memory": "512Mi"},
                       "max": {"cpu": "2", "memory": "4Gi"}}]


def test_plan_fields_size_quota_and_limits() -> None:
    plan = PlanSpec.model_validate({
        "model": "m", "namespaceQuota": {"requests": {"cpu": 8, "memory": "16Gi"},
                                         "pods": 50, "persistentVolumeClaims": 0},
        "containerLimits": {"max": {"cpu": "4000m", "memory": "8192Mi"}}})
    spec = spec_of(plan)
    quota = hard(spec)
    assert (quota["requests.cpu"], quota["requests.memory"], quota["pods"]) == ("8", "16Gi", "50")
    assert quota["persistentvolumeclaims"] == "0" and quota["limits.cpu"] == "4"  # default kept
    limits = guardrails.limit_range(spec, "tenant-acme")["spec"]["limits"][0]
    assert limits["max"] == {"cpu": "4", "memory": "8Gi"}  # written canonically


def test_silo_quota_leaves_room_for_its_database() -> None:
    silo = spec_of(isolation="silo", database={
        "storage": {"size": "50Gi"},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                      "limits": {"cpu": 3, "memory": "6Gi"}}})
    quota = hard(silo)
    assert quota["requests.cpu"] == "2500m" and quota["requests.memory"] == "5Gi"
    assert quota["limits.cpu"] == "7" and quota["limits.memory"] == "14Gi"
    assert quota["requests.storage"] == "70Gi"
    assert (quota["pods"], quota["services"], quota["persistentvolumeclaims"]) == ("21", "12", "6")
    # The database's limits are above the plan's max: the max is raised so its Pod is admitted.
    limits = guardrails.limit_range(silo, "tenant-acme")["spec"]["limits"][0]
    assert limits["max"] == {"cpu": "3", "memory": "6Gi"}
    assert limits["default"] == {"cpu": "500m", "memory": "512Mi"}


def test_silo_database_without_resources_counts_the_limit_range_defaults() -> None:
    bare = hard(spec_of(isolation="silo", database={"storage": {"size": "1Gi"}}))
    assert bare["requests.cpu"] == "2100m" and bare["requests.memory"] == "4224Mi"
    assert bare["limits.cpu"] == "4500m" and bare["limits.memory"] == "8704Mi"
    # A limit alone is also the request (the API server's defaulting).
    only_limits = hard(spec_of(isolation="silo", database={
        "storage": {"size": "1Gi"}, "resources": {"limits": {"cpu": "1", "memory": "2Gi"}}}))
    assert only_limits["requests.cpu"] == "3" and only_limits["requests.memory"] == "6Gi"


def test_service_account_mounts_no_token_and_everything_carries_the_tenant_marks() -> None:
    manifests = guardrails.guardrail_manifests(spec_of(), "tenant-acme", "rt", "op")
    account = next(m for m in manifests if m["kind"] == "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert [m["kind"] for m in manifests][:2] == ["ResourceQuota", "LimitRange"]
    assert not [m for m in manifests if "Binding" in m["kind"]]
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["tenantry.dev/tenant"] == "acme"
        assert labels["app.kubernetes.io/managed-by"] == "tenantry-operator"
        assert manifest["metadata"]["namespace"] == "tenant-acme"


def test_max_tokens_above_the_plans_tokens_per_minute_is_refused() -> None:
    free = PlanSpec.model_validate({"model": "m", "maxTokensPerRequest": 1024,
                                    "rateLimits": {"tokensPerMinute": 20000}})
    with pytest.raises(PlanViolation) as raised:
        spec_of(free, ai={"maxTokensPerRequest": 30000})
    assert raised.value.reason == "MaxTokensAboveRateLimit"
    assert ("maxTokensPerRequest 30000 (set on the Tenant) exceeds rateLimits.tokensPerMinute"
            " 20000 (from plan 'p')") in str(raised.value)
    # The other way round: the Tenant lowers tokensPerMinute under the plan's maxTokens.
    with pytest.raises(PlanViolation, match=r"1024 \(from plan 'p'\) exceeds .* 1000 \(set on"):
        spec_of(free, ai={"rateLimits": {"tokensPerMinute": 1000}})
    assert spec_of(free, ai={"maxTokensPerRequest": 20000}).ai.max_tokens_per_request == 20000


def test_failures_are_announced_once_per_transition() -> None:
    def as_status(*conditions: Condition) -> list[dict[str, str]]:
        return [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
                for c in conditions]

    bad = Condition("PlanResolved", False, "MaxTokensAboveRateLimit", "too many")
    warned = transitions([], as_status(bad))
    assert [(e.type, e.reason) for e in warned] == [("Warning", "MaxTokensAboveRateLimit")]
    assert transitions(as_status(bad), as_status(bad)) == []  # a resync: no second Event
    other = Condition("PlanResolved", False, "IsolationNotAllowed", "no")
    assert [e.reason for e in transitions(as_status(bad), as_status(other))] == [
        "IsolationNotAllowed"]
    assert phase_of(None, [bad]) == "Failed"
    endpoint = Condition("RuntimeRecordReady", False, "EndpointKeyMissing", "no Secret")
    assert phase_of(None, [Condition("PlanResolved", True, "Resolved"), endpoint]) == "Failed"


# --- the operator against the real control plane ------------------------------------------------


def events(plane: ControlPlane, tenant: str, reason: str) -> list[dict[str, Any]]:
    out = plane.kubectl("get", "events", "-A", "-o", "json", "--field-selector",
                        f"involvedObject.name={tenant},reason={reason}")
    found: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return found


def guardrail_objects(plane: ControlPlane, namespace: str) -> dict[str, set[str]]:
    kinds = ("resourcequota", "limitrange", "networkpolicy", "serviceaccount", "rolebinding")
    return {kind: {o["metadata"]["name"] for o in (get_json(plane, kind, "-n", namespace)
                                                    or {}).get("items", [])}
            for kind in kinds}


@pytest.mark.usefixtures("operator")
def test_guardrails_exist_after_reconcile_and_return_after_deletion_by_hand(
        control_plane: ControlPlane) -> None:
    apply_tenant(control_plane, "grdpool", deletionPolicy="Delete",
                 network={"allowIngressFromNamespaces": ["ingress-nginx"],
                          "allowEgressCIDRs": ["203.0.113.0/24"]})
    status = wait_ready(control_plane, "grdpool", timeout=90)
    assert condition(status, "GuardrailsReady")["status"] == "True"
    ns = "tenant-grdpool"
    expected = {
        "resourcequota": {guardrails.QUOTA_NAME},
        "limitrange": {guardrails.LIMIT_RANGE_NAME},
        "networkpolicy": {guardrails.POLICY_DEFAULT_DENY, guardrails.POLICY_DNS,
                          guardrails.POLICY_WORKLOADS},
        "serviceaccount": {guardrails.SERVICE_ACCOUNT_NAME, "default"},
        "rolebinding": set(),
    }
    wait_for("the guardrails", lambda: guardrail_objects(control_plane, ns) == expected)
    account = get_json(control_plane, "serviceaccount", guardrails.SERVICE_ACCOUNT_NAME,
                       "-n", ns) or {}
    assert account["automountServiceAccountToken"] is False
    who = f"--as=system:serviceaccount:{ns}:{guardrails.SERVICE_ACCOUNT_NAME}"
    for verb, resource in (("get", "secrets"), ("list", "pods"), ("get", "configmaps")):
        answer = control_plane.kubectl("auth", "can-i", verb, resource, "-n", ns, who,
                                       check=False).stdout.strip()
        assert answer == "no", (verb, resource, answer)
    quota = get_json(control_plane, "resourcequota", guardrails.QUOTA_NAME, "-n", ns) or {}
    assert quota["spec"]["hard"]["pods"] == "20"

    # The LimitRange is live: a Pod without resources gets the plan's defaults; one above the
    # max is refused by admission.
    def pod(name: str, resources: dict[str, Any]) -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                           "spec": {"serviceAccountName": guardrails.SERVICE_ACCOUNT_NAME,
                                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                                        "seccompProfile":
                                                            {"type": "RuntimeDefault"}},
                                    "containers": [{
                                        "name": "app", "image": "app", "resources": resources,
                                        "securityContext": {
                                            "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}}}]}})
    control_plane.kubectl("apply", "-n", ns, "-f", "-", input_text=pod("plain", {}))
    created = get_json(control_plane, "pod", "plain", "-n", ns) or {}
    assert created["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"}}
    refused = control_plane.kubectl("apply", "-n", ns, "-f", "-", check=False, input_text=pod(
        "greedy", {"limits": {"cpu": "3", "memory": "1Gi"}}))
    assert refused.returncode != 0 and "maximum cpu usage per Container is 2" in refused.stderr

    # Deleted by hand: every one comes back on the next resync, the same as before.
    for kind, name in (("resourcequota", guardrails.QUOTA_NAME),
                       ("limitrange", guardrails.LIMIT_RANGE_NAME),
                       ("networkpolicy", guardrails.POLICY_DEFAULT_DENY),
                       ("networkpolicy", guardrails.POLICY_WORKLOADS),
                       ("serviceaccount", guardrails.SERVICE_ACCOUNT_NAME)):
        control_plane.kubectl("delete", kind, name, "-n", ns)
    wait_for("the guardrails to come back",
             lambda: guardrail_objects(control_plane, ns) == expected, timeout=60)
    policy = get_json(control_plane, "networkpolicy", guardrails.POLICY_WORKLOADS, "-n", ns) or {}
    assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in policy["spec"]["egress"][0]["to"]
    delete_tenant(control_plane, "grdpool")


@pytest.mark.usefixtures("operator")
def test_invalid_tenants_get_a_condition_and_one_event_and_the_others_are_served(
        control_plane: ControlPlane) -> None:
    # free: maxTokensPerRequest 1024, tokensPerMinute 20000, isolation pool only.
    apply_tenant(control_plane, "grdtokens", deletionPolicy="Delete",
                 ai={"maxTokensPerRequest": 30000})
    apply_tenant(control_plane, "grdiso", deletionPolicy="Delete", isolation="bridge")
    apply_tenant(control_plane, "grdgood", deletionPolicy="Delete")
    wait_ready(control_plane, "grdgood", timeout=90)
    for tenant, reason, words in (
            ("grdtokens", "MaxTokensAboveRateLimit",
             "maxTokensPerRequest 30000 (set on the Tenant) exceeds rateLimits.tokensPerMinute"
             " 20000 (from plan 'free')"),
            ("grdiso", "IsolationNotAllowed", "plan 'free' allows isolation pool")):
        status = wait_for(f"{tenant} Failed", lambda t=tenant: (
            (s := tenant_status(control_plane, t)).get("phase") == "Failed" and s))
        cond = condition(status, "PlanResolved")
        assert (cond["status"], cond["reason"]) == ("False", reason)
        assert words in cond["message"]
        assert condition(status, "Ready")["reason"] == reason
        # Nothing was provisioned for it: not even its namespace.
        assert get_json(control_plane, "namespace", f"tenant-{tenant}") is None
        wait_for(f"the {reason} Event", lambda t=tenant, r=reason: events(control_plane, t, r))
    posted = {t: len(events(control_plane, t, r)) for t, r in (
        ("grdtokens", "MaxTokensAboveRateLimit"), ("grdiso", "IsolationNotAllowed"))}
    time.sleep(7)  # two resyncs (3 s apart): the Event is posted on the transition, not again
    for tenant, reason in (("grdtokens", "MaxTokensAboveRateLimit"),
                           ("grdiso", "IsolationNotAllowed")):
        found = events(control_plane, tenant, reason)
        # (A create event racing the first resync may both see no status yet: at most that.)
        assert 1 <= len(found) == posted[tenant] <= 2, found
        assert found[0]["type"] == "Warning" and found[0]["involvedObject"]["kind"] == "Tenant"
        assert found[0]["message"].startswith("PlanResolved: ")
    assert tenant_status(control_plane, "grdgood")["phase"] == "Ready"
    # A served tenant edited into an invalid combination keeps what it had: its namespace and
    # the runtime's config stay as they were (not rewritten with the refused numbers).
    apply_tenant(control_plane, "grdgood", deletionPolicy="Delete",
                 ai={"maxTokensPerRequest": 25000})
    wait_for("grdgood Failed", lambda: tenant_status(control_plane, "grdgood").get("phase")
             == "Failed")
    configmap = get_json(control_plane, "configmap", "tenantry-runtime-config", "-n",
                         "tenant-grdgood") or {}
    assert json.loads(configmap["data"]["config.json"])["max_tokens_per_request"] == 1024
    # Fixed: they converge.
    apply_tenant(control_plane, "grdgood", deletionPolicy="Delete")
    apply_tenant(control_plane, "grdtokens", deletionPolicy="Delete",
                 ai={"maxTokensPerRequest": 1000})
    wait_ready(control_plane, "grdtokens", timeout=90)
    wait_ready(control_plane, "grdgood", timeout=90)
    for tenant in ("grdtokens", "grdiso", "grdgood"):
        delete_tenant(control_plane, tenant)


@pytest.mark.usefixtures("operator")
def test_dedicated_endpoint_without_its_secret_says_so_and_converges_once_it_exists(
        control_plane: ControlPlane) -> None:
    apply_tenant(control_plane, "grdendpoint", deletionPolicy="Delete", ai={"endpoint": {
        "type": "dedicated", "url": "http://127.0.0.1:9/v1", "secretRef": {"name": "model-key"}}})
    status = wait_for("EndpointKeyMissing", lambda: (
        condition(s := tenant_status(control_plane, "grdendpoint"), "RuntimeRecordReady").get(
            "reason") == "EndpointKeyMissing" and s), timeout=90)
    cond = condition(status, "RuntimeRecordReady")
    assert "Secret tenant-grdendpoint/model-key (spec.ai.endpoint.secretRef) does not exist" in (
        cond["message"])
    assert status["phase"] == "Failed"
    wait_for("the EndpointKeyMissing Event",
             lambda: events(control_plane, "grdendpoint", "EndpointKeyMissing"))
    control_plane.kubectl("create", "secret", "generic", "model-key", "-n", "tenant-grdendpoint",
                          "--from-literal=other=x")
    wait_for("has no key", lambda: "has no key 'api-key'" in condition(
        tenant_status(control_plane, "grdendpoint"), "RuntimeRecordReady").get("message", ""),
        timeout=60)
    control_plane.kubectl("delete", "secret", "model-key", "-n", "tenant-grdendpoint")
    control_plane.kubectl("create", "secret", "generic", "model-key", "-n", "tenant-grdendpoint",
                          "--from-literal=api-key=sk-test")
    wait_ready(control_plane, "grdendpoint", timeout=60)
    delete_tenant(control_plane, "grdendpoint")


def test_plan_crd_defaults_the_guardrail_fields_and_refuses_inverted_limits(
        control_plane: ControlPlane) -> None:
    def plan(name: str, **spec: Any) -> Any:
        return control_plane.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-",
                                     check=False, input_text=json.dumps({
                                         "apiVersion": "tenantry.dev/v1alpha1",
                                         "kind": "TenantPlan", "metadata": {"name": name},
                                         "spec": {"model": "m", **spec}}))
    defaulted = plan("grdplan", namespaceQuota={"pods": 7}, containerLimits={"max": {"cpu": 1}})
    assert defaulted.returncode == 0, defaulted.stderr
    spec = json.loads(defaulted.stdout)["spec"]
    assert spec["namespaceQuota"] == {
        "pods": 7, "services": 10, "persistentVolumeClaims": 5,
        "requests": {"cpu": "2", "memory": "4Gi", "storage": "20Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"}}
    assert spec["containerLimits"]["max"] == {"cpu": 1, "memory": "4Gi"}
    # The model reads what the server stored.
    assert PlanSpec.model_validate(spec).container_limits.max.cpu == 1
    inverted = plan("grdbadplan", containerLimits={"defaultRequest": {"cpu": "3"}})
    assert inverted.returncode != 0
    assert "defaultRequest <= default <= max" in inverted.stderr
    negative = plan("grdbadplan", namespaceQuota={"requests": {"memory": "-1Gi"}})
    assert "must be a positive quantity" in negative.stderr
