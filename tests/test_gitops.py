"""GitOps: the Argo CD health checks in a real Lua 5.1, the example Argo CD layout, and the
claim the guide rests on: the operator never writes a Tenant's spec, so Argo CD sees no drift."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import apply_tenant, condition, get_json, tenant_status, wait_for, wait_ready
from lupa import lua51
from tenantry_devenv.controlplane import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[1]
ARGOCD = REPO_ROOT / "examples" / "argocd"
CUSTOMIZATIONS = ARGOCD / "resource_customizations"
TENANT_CHECK = CUSTOMIZATIONS / "tenantry.dev" / "Tenant"
APPLICATION_CHECK = CUSTOMIZATIONS / "argoproj.io" / "Application"
# gitops-engine's health codes; Argo CD turns any other status into Unknown.
HEALTH_CODES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
WAVE = "argocd.argoproj.io/sync-wave"

# Argo CD runs a custom check with the base, package and table libraries and a "safe" os
# (time, date) only (util/lua/lua.go): no string library, so no string methods either.
SANDBOX = """
local source, obj = ...
getmetatable("").__index = nil
local env = {obj = obj, table = table, os = {time = os.time, date = os.date}}
for _, name in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "print",
                       "rawequal", "rawget", "rawset", "select", "setmetatable",
                       "getmetatable", "tonumber", "tostring", "type", "unpack", "xpcall"}) do
  env[name] = _G[name]
end
local chunk = assert(loadstring(source, "health.lua"))
setfenv(chunk, env)
local hs = chunk()
return hs.status, hs.message
"""


def argo_health(script: Path, obj: dict[str, Any]) -> dict[str, str]:
    """What Argo CD would show for `obj`: the script run as Argo CD runs it, in Lua 5.1."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    # Through JSON, as Argo CD hands the object over: numbers become Lua numbers.
    table = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    status, message = lua.execute(SANDBOX, script.read_text(), table)
    assert status in HEALTH_CODES, f"{script} returned {status!r}"
    assert isinstance(message, str)
    return {"status": status, "message": message}


# --------------------------------------------------------------------------------- Lua checks


def health_cases(check: Path) -> list[Any]:
    tests = yaml.safe_load((check / "health_test.yaml").read_text())["tests"]
    return [pytest.param(t, id=Path(t["inputPath"]).stem) for t in tests]


@pytest.mark.parametrize("case", health_cases(TENANT_CHECK))
def test_tenant_health_fixtures(case: dict[str, Any]) -> None:
    """Argo CD's own test layout (health_test.yaml + testdata/), so the check can go upstream."""
    obj = yaml.safe_load((TENANT_CHECK / case["inputPath"]).read_text())
    assert argo_health(TENANT_CHECK / "health.lua", obj) == case["healthStatus"]


def test_tenant_health_fixtures_cover_every_outcome() -> None:
    statuses = {c.values[0]["healthStatus"]["status"] for c in health_cases(TENANT_CHECK)}
    assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended"}
    inputs = {c.values[0]["inputPath"] for c in health_cases(TENANT_CHECK)}
    assert inputs == {f"testdata/{p.name}" for p in (TENANT_CHECK / "testdata").glob("*.yaml")}


def test_tenant_health_fixtures_use_the_crds_status_fields() -> None:
    """The fixtures' status fields are the CRD's, so the check reads fields that exist."""
    crd = yaml.safe_load((REPO_ROOT / "crds" / "tenantry.dev_tenants.yaml").read_text())
    status_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "status"]["properties"]
    for fixture in (TENANT_CHECK / "testdata").glob("*.yaml"):
        status = yaml.safe_load(fixture.read_text()).get("status") or {}
        assert set(status) <= set(status_schema), fixture.name
        assert set(status.get("migration") or {}) <= set(
            status_schema["migration"]["properties"]), fixture.name
        assert status.get("phase", "Ready") in status_schema["phase"]["enum"], fixture.name
        for cond in status.get("conditions") or ():
            assert set(cond) <= set(status_schema["conditions"]["items"]["properties"])
            assert cond["status"] in status_schema["conditions"]["items"]["properties"][
                "status"]["enum"], fixture.name


def test_string_library_is_out_of_reach_as_in_argo_cd(tmp_path: Path) -> None:
    """The sandbox is as strict as Argo CD's: a script using string methods fails here too."""
    for body in ('("Healthy"):lower()', 'string.lower("Healthy")'):
        bad = tmp_path / "bad.lua"
        bad.write_text(f'local hs = {{status = {body}, message = ""}}\nreturn hs\n')
        with pytest.raises(lua51.LuaError, match="attempt to"):
            argo_health(bad, {"metadata": {}})


@pytest.mark.parametrize(("status", "expected"), [
    (None, {"status": "Progressing", "message": ""}),
    ({"health": {"status": "Healthy"}}, {"status": "Healthy", "message": ""}),
    ({"health": {"status": "Degraded", "message": "CrashLoopBackOff"}},
     {"status": "Degraded", "message": "CrashLoopBackOff"}),
])
def test_application_health(status: dict[str, Any] | None, expected: dict[str, str]) -> None:
    obj: dict[str, Any] = {"metadata": {"name": "tenantry-platform"}}
    if status is not None:
        obj["status"] = status
    assert argo_health(APPLICATION_CHECK / "health.lua", obj) == expected


def test_argocd_cm_carries_the_tested_scripts() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    assert data == {
        "resource.customizations.health.tenantry.dev_Tenant":
            (TENANT_CHECK / "health.lua").read_text(),
        "resource.customizations.health.argoproj.io_Application":
            (APPLICATION_CHECK / "health.lua").read_text(),
    }


# --------------------------------------------------------------------------------- layout


def manifests(folder: Path) -> list[dict[str, Any]]:
    return [doc for path in sorted(folder.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def wave(obj: dict[str, Any]) -> int:
    return int((obj["metadata"].get("annotations") or {}).get(WAVE, "0"))


def test_applications_point_at_this_repository_and_order_their_waves() -> None:
    apps = {a["metadata"]["name"]: a for a in manifests(ARGOCD / "apps")}
    root = yaml.safe_load((ARGOCD / "root-app.yaml").read_text())
    assert root["spec"]["source"]["path"] == "examples/argocd/apps"
    for app in [root, *apps.values()]:
        assert app["kind"] == "Application"
        assert (REPO_ROOT / app["spec"]["source"]["path"]).is_dir(), app["metadata"]["name"]
    platform, tenants = apps["tenantry-platform"], apps["tenantry-tenants"]
    assert platform["spec"]["source"]["path"] == "charts/tenantry"
    assert tenants["spec"]["source"]["path"] == "examples/argocd/tenants"
    assert wave(platform) < wave(tenants)
    objects = manifests(ARGOCD / "tenants")
    plans = [o for o in objects if o["kind"] == "TenantPlan"]
    tenant_objs = [o for o in objects if o["kind"] == "Tenant"]
    assert plans and tenant_objs
    assert max(map(wave, plans)) < min(map(wave, tenant_objs))
    # Every tenant names a plan of the folder, which allows its isolation.
    allowed = {p["metadata"]["name"]: p["spec"]["allowedIsolation"] for p in plans}
    for tenant in tenant_objs:
        assert tenant["spec"]["isolation"] in allowed[tenant["spec"]["planRef"]["name"]]


def test_platform_values_render_with_the_chart(tmp_path: Path) -> None:
    """The Application's Helm values pass values.schema.json and render."""
    from test_chart import render

    values = yaml.safe_load((ARGOCD / "apps" / "platform.yaml").read_text())[
        "spec"]["source"]["helm"]["valuesObject"]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    helm = helm_command()
    docs = render(helm, "-f", str(path))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    # The plans have one owner: the tenants' Application, not the chart.
    assert "TenantPlan" not in kinds


def helm_command() -> list[str]:
    from test_chart import BUILD_SCRIPT

    built = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                           check=True)
    return [str(Path(built.stdout.strip().splitlines()[-1]) / "helm")]


def test_tenant_folder_passes_server_dry_run(control_plane: ControlPlane) -> None:
    """Plans and tenants are valid for the CRDs (schema and CEL rules) on a real API server."""
    result = control_plane.kubectl("apply", "--server-side", "--dry-run=server",
                                   "--field-manager=argocd-controller", "-f",
                                   str(ARGOCD / "tenants"), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(manifests(ARGOCD / "tenants"))


# --------------------------------------------------------------------------------- no drift


def tenant_manifest(name: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
                       "metadata": {"name": name},
                       "spec": {"planRef": {"name": "pro"}, "isolation": "pool", **spec}})


def argo_apply(plane: ControlPlane, manifest: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """As Argo CD's ServerSideApply=true: server-side apply under Argo CD's field manager."""
    result: subprocess.CompletedProcess[str] = plane.kubectl(
        "apply", "--server-side", "--field-manager=argocd-controller", *extra, "-f", "-",
        input_text=manifest, check=False)
    return result


def spec_owners(obj: dict[str, Any]) -> set[str]:
    """Field managers that own any field under .spec."""
    return {entry["manager"] for entry in obj["metadata"].get("managedFields") or ()
            if "f:spec" in (entry.get("fieldsV1") or {})}


@pytest.mark.usefixtures("operator")
def test_operator_never_writes_a_tenant_spec(control_plane: ControlPlane) -> None:
    """After reconciles (events and the resync timer), spec and generation are what Git says,
    only Argo CD's field manager owns .spec, and Argo CD's server-side diff finds nothing."""
    from tenantry_operator.settings import get_settings

    name = "gitopsdrift"
    manifest = tenant_manifest(name, apiKeys=[{"name": "app"}], ai={"budgets": {
        "dailyTokens": 300000}})
    assert argo_apply(control_plane, manifest).returncode == 0
    wait_ready(control_plane, name, timeout=120)
    applied = get_json(control_plane, "tnt", name) or {}
    # A raise by pull request: a new generation, reconciled.
    raised = tenant_manifest(name, apiKeys=[{"name": "app"}], ai={"budgets": {
        "dailyTokens": 600000}})
    assert argo_apply(control_plane, raised).returncode == 0
    wait_for("generation 2 reconciled", lambda: (
        (s := tenant_status(control_plane, name)).get("observedGeneration") == 2
        and s.get("phase") == "Ready"), timeout=120)
    # Let the resync timer re-apply everything a few times.
    time.sleep(3 * get_settings().reconcile_interval_seconds)
    live = get_json(control_plane, "tnt", name, "--show-managed-fields") or {}
    assert live["metadata"]["generation"] == 2
    expected = json.loads(json.dumps(applied["spec"]))
    expected["ai"]["budgets"]["dailyTokens"] = 600000
    assert live["spec"] == expected
    assert spec_owners(live) == {"argocd-controller"}
    # The operator's writes are there, only elsewhere: status and metadata.
    assert len(live["metadata"]["managedFields"]) > 1
    # What Argo CD's server-side diff runs: no difference, and a re-sync changes nothing.
    diff = control_plane.kubectl("diff", "--server-side", "--field-manager=argocd-controller",
                                 "-f", "-", input_text=raised, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert argo_apply(control_plane, raised).returncode == 0
    after = get_json(control_plane, "tnt", name) or {}
    assert after["metadata"]["generation"] == 2
    assert after["metadata"]["resourceVersion"] == live["metadata"]["resourceVersion"]
    control_plane.kubectl("delete", "tnt", name, "--wait=false")


# --------------------------------------------------------------------------------- live health


@pytest.mark.usefixtures("operator")
def test_health_of_tenants_the_operator_reconciled(control_plane: ControlPlane) -> None:
    """The Lua check reads the status the real operator writes, not only hand-made fixtures."""
    script = TENANT_CHECK / "health.lua"

    def health(name: str) -> dict[str, str]:
        return argo_health(script, get_json(control_plane, "tnt", name) or {})

    apply_tenant(control_plane, "gitopsok", plan="pro", isolation="pool")
    apply_tenant(control_plane, "gitopssusp", plan="pro", isolation="pool", suspended=True)
    # The free plan allows pool only: a person must change the plan or the isolation.
    apply_tenant(control_plane, "gitopsbad", plan="free", isolation="bridge")
    apply_tenant(control_plane, "gitopsnoplan", plan="nosuchplan", isolation="pool")
    try:
        wait_ready(control_plane, "gitopsok", timeout=120)
        assert health("gitopsok") == {"status": "Healthy",
                                      "message": "all resources are provisioned"}
        wait_for("gitopssusp Suspended", lambda: tenant_status(
            control_plane, "gitopssusp").get("phase") == "Suspended", timeout=120)
        assert health("gitopssusp")["status"] == "Suspended"
        wait_for("gitopsbad Failed", lambda: tenant_status(
            control_plane, "gitopsbad").get("phase") == "Failed", timeout=60)
        bad = health("gitopsbad")
        assert bad["status"] == "Degraded" and bad["message"].startswith("IsolationNotAllowed: ")
        wait_for("gitopsnoplan reported", lambda: condition(tenant_status(
            control_plane, "gitopsnoplan"), "Ready").get("reason") == "PlanNotFound", timeout=60)
        missing = health("gitopsnoplan")
        assert missing["status"] == "Progressing"
        assert missing["message"].startswith("PlanNotFound: ")
        assert "nosuchplan" in missing["message"]
        # A spec change the operator has not seen yet is Progressing, whatever the old status.
        control_plane.kubectl("patch", "tnt", "gitopsok", "--type=merge", "-p",
                              json.dumps({"spec": {"ai": {"budgets": {"dailyTokens": 1000}}}}))
        obj = get_json(control_plane, "tnt", "gitopsok") or {}
        if obj["status"]["observedGeneration"] < obj["metadata"]["generation"]:
            assert argo_health(script, obj)["status"] == "Progressing"
        wait_for("gitopsok at generation 2", lambda: health("gitopsok")["status"] == "Healthy"
                 and tenant_status(control_plane, "gitopsok")["observedGeneration"] == 2,
                 timeout=120)
    finally:
        control_plane.kubectl("delete", "tnt", "gitopsok", "gitopssusp", "gitopsbad",
                              "gitopsnoplan", "--wait=false")
