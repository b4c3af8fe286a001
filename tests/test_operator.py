"""The operator in-process against the real control plane: Tenants reach Ready and are finalized."""

from __future__ import annotations

import json

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

pytestmark = pytest.mark.usefixtures("operator")


def test_pool_tenant_reaches_ready_with_namespace_and_conditions(
    control_plane: ControlPlane,
) -> None:
    apply_tenant(control_plane, "opready", deletionPolicy="Delete")
    status = wait_ready(control_plane, "opready")
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "NamespaceReady")["status"] == "True"
    assert condition(status, "Ready")["observedGeneration"] == 1
    assert status["observedGeneration"] == 1
    assert status["provisioned"]["namespace"] == "tenant-opready"
    ns = get_json(control_plane, "namespace", "tenant-opready")
    assert ns is not None
    assert ns["metadata"]["labels"]["tenantry.dev/tenant"] == "opready"
    # No owner reference: a cascading deletion must not take the namespace before the finalizer.
    assert not ns["metadata"].get("ownerReferences")
    table = control_plane.kubectl("get", "tnt", "opready").stdout
    assert "PLAN" in table and "READY" in table
    assert table.splitlines()[1].split()[:5] == ["opready", "free", "pool", "Ready", "True"]
    tenant = get_json(control_plane, "tnt", "opready") or {}
    assert "tenantry.dev/cleanup" in tenant["metadata"]["finalizers"]

    delete_tenant(control_plane, "opready")
    wait_for("namespace deletion", lambda: (
        (ns := get_json(control_plane, "namespace", "tenant-opready")) is None
        or ns["status"]["phase"] == "Terminating"))


def test_namespace_deleted_by_hand_is_recreated(control_plane: ControlPlane) -> None:
    apply_tenant(control_plane, "oprepair", deletionPolicy="Delete")
    wait_ready(control_plane, "oprepair")
    uid = (get_json(control_plane, "namespace", "tenant-oprepair") or {})["metadata"]["uid"]
    control_plane.kubectl("delete", "namespace", "tenant-oprepair", "--wait=true",
                          "--timeout=60s")
    recreated = wait_for("the namespace to come back", lambda: (
        (ns := get_json(control_plane, "namespace", "tenant-oprepair")) is not None
        and ns["metadata"]["uid"] != uid and ns), timeout=60)
    assert recreated["metadata"]["labels"]["tenantry.dev/tenant"] == "oprepair"
    delete_tenant(control_plane, "oprepair")


def test_missing_plan_waits_then_converges_when_the_plan_appears(
    control_plane: ControlPlane,
) -> None:
    plan = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "TenantPlan",
            "metadata": {"name": "latecomer"}, "spec": {"model": "claude-haiku-4-5"}}
    body = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "opplan"},
            "spec": {"planRef": {"name": "latecomer"}, "deletionPolicy": "Delete"}}
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(body))
    status = wait_for("PlanNotFound", lambda: (
        condition(s := tenant_status(control_plane, "opplan"), "PlanResolved").get("reason")
        == "PlanNotFound" and s))
    assert status["phase"] == "Provisioning"
    assert condition(status, "Ready")["status"] == "False"
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(plan))
    wait_ready(control_plane, "opplan", timeout=90)
    delete_tenant(control_plane, "opplan")
    control_plane.kubectl("delete", "tenantplan", "latecomer")


def test_isolation_outside_the_plan_fails_with_reason(control_plane: ControlPlane) -> None:
    apply_tenant(control_plane, "opdenied", isolation="bridge", deletionPolicy="Delete")
    status = wait_for("Failed phase", lambda: (
        (s := tenant_status(control_plane, "opdenied")).get("phase") == "Failed" and s))
    cond = condition(status, "PlanResolved")
    assert cond["reason"] == "IsolationNotAllowed"
    assert "allows isolation pool" in cond["message"]
    assert get_json(control_plane, "namespace", "tenant-opdenied") is None
    delete_tenant(control_plane, "opdenied")


def test_retain_keeps_the_namespace_and_unlinks_it(control_plane: ControlPlane) -> None:
    apply_tenant(control_plane, "opretain")  # deletionPolicy defaults to Retain
    wait_ready(control_plane, "opretain")
    delete_tenant(control_plane, "opretain")
    ns = get_json(control_plane, "namespace", "tenant-opretain")
    assert ns is not None and ns["status"]["phase"] == "Active"
    assert not ns["metadata"].get("ownerReferences")
    assert ns["metadata"]["labels"]["tenantry.dev/retained"] == "true"
    events = control_plane.kubectl("get", "events", "-A", "--field-selector",
                                   "involvedObject.name=opretain,reason=Finalized").stdout
    assert "retained" in events
