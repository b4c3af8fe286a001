"""The operator and the runtime under the identities the chart gives them, on a real API server.

The chart is rendered and applied (CRDs first, from the chart's crds/) to a control plane of
this module's own, so no other operator reconciles its Tenants. Each process then gets a token
of its chart ServiceAccount (TokenRequest API, `kubectl create token`) in a kubeconfig of its
own and does its whole job: the operator reconciles a Tenant to Ready (and deletes it), the
runtime loads the tenant's record and answers the official SDK. What the Roles leave out stays
forbidden, asked of the API server with the same tokens.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import psycopg
import pytest
import yaml
from kube_helpers import get_json, wait_for, wait_ready
from psycopg import sql
from tenantry_devenv.controlplane import ControlPlane, start_control_plane
from tenantry_devenv.processes import free_port
from tenantry_devenv.services import Postgres, Redis
from tenantry_runtime.contracts.database import APP_ROLE
from test_chart import CHART, REPO_ROOT, Manifest, helm_fixture, render  # noqa: F401 - a fixture

RELEASE_NAMESPACE = "tenantry-system"
RUNTIME_NAMESPACE = "tenantry-runtime"
STUB_KEY = "identity-stub-key"


# --------------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    saved = os.environ.get("KUBECONFIG")
    plane = start_control_plane(tmp_path_factory.mktemp("identity") / "cluster")
    if saved is None:  # start_control_plane sets it only when unset; do not leak ours
        os.environ.pop("KUBECONFIG", None)
    try:
        yield plane
    finally:
        plane.stop()


@dataclass(frozen=True)
class Installed:
    docs: list[Manifest]

    def find(self, kind: str, component: str) -> Manifest:
        found = [d for d in self.docs if d["kind"] == kind and (
            d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == component]
        assert len(found) == 1, (kind, component, [d["metadata"]["name"] for d in found])
        return found[0]

    def operator(self) -> Manifest:
        found = [d for d in self.docs if d["kind"] == "Deployment"
                 and d["metadata"]["namespace"] == RELEASE_NAMESPACE]
        assert len(found) == 1
        return found[0]

    def runtime(self) -> Manifest:
        return self.find("Deployment", "runtime")


@pytest.fixture(scope="module")
def installed(helm: list[str], plane: ControlPlane) -> Installed:
    """The chart applied for real: CRDs first (Helm's order), then every rendered object."""
    plane.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/tenants.tenantry.dev", "crd/tenantplans.tenantry.dev")
    plane.kubectl("create", "namespace", RELEASE_NAMESPACE)
    docs = render(helm, "-f", str(CHART / "ci" / "default-values.yaml"), "--set",
                  f"runtimeNamespace.name={RUNTIME_NAMESPACE}", namespace=RELEASE_NAMESPACE)
    result = plane.kubectl("apply", "--server-side", "-f", "-",
                           input_text=yaml.safe_dump_all(docs, sort_keys=False))
    assert result.stdout.count("serverside-applied") == len(docs), result.stdout
    return Installed(docs)


def token_kubeconfig(plane: ControlPlane, account: Manifest, path: Path) -> Path:
    """A kubeconfig that authenticates as `account` only, with a token from the TokenRequest API."""
    meta = account["metadata"]
    token = plane.kubectl("create", "token", meta["name"], "-n", meta["namespace"],
                          "--duration=2h").stdout.strip()
    admin = yaml.safe_load(plane.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "plane", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "plane", "user": "sa"}}]}))
    return path


def as_account(plane: ControlPlane, kubeconfig: Path,
               *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(plane.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
                          capture_output=True, text=True, check=False, timeout=60)


def forbidden(plane: ControlPlane, kubeconfig: Path, *args: str) -> bool:
    result = as_account(plane, kubeconfig, *args)
    # The API server's refusal, naming the ServiceAccount (not a typo or a missing object).
    assert result.returncode != 0 and 'is forbidden: User "system:serviceaccount:' in (
        result.stderr), (
        f"kubectl {' '.join(args)} as {kubeconfig.stem}: {result.stdout}{result.stderr}")
    return True


def allowed(plane: ControlPlane, kubeconfig: Path, *args: str) -> bool:
    result = as_account(plane, kubeconfig, *args)
    assert result.returncode == 0, result.stderr
    return True


# --------------------------------------------------------------------------------- processes


def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without its own Tenantry settings (an in-process operator's
    database, Redis, kubeconfig must not leak in), the repository's packages importable."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("TENANTRY_") and k not in {"KUBECONFIG", "POD_NAME"}}
    base["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "operator"), str(REPO_ROOT / "runtime"), base.get("PYTHONPATH", "")])
    return {**base, **env}


def literal_env(deployment: Manifest) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def chart_env(deployment: Manifest, **overrides: str) -> dict[str, str]:
    return container_env(deployment["spec"]["template"]["spec"]["containers"][0], **overrides)


def container_env(container: Manifest, **overrides: str) -> dict[str, str]:
    """The container's literal env as the chart renders it; `overrides` stand in for what a
    Pod would get from Secrets and the downward API (and for ports and paths of this machine).
    Every variable the chart takes from elsewhere must be given, so none is forgotten."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            assert entry["name"] in overrides, f"{entry['name']} ({entry['valueFrom']}) not given"
    env.update(overrides)
    return clean_env(**env)


@dataclass
class Started:
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)


def start(argv: list[str], env: dict[str, str], log: Path) -> Started:
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    return Started(popen, log)


@pytest.fixture
def processes() -> Iterator[list[Started]]:
    started: list[Started] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def runtime_login(shared_database: str, postgres: Postgres) -> str:
    """A Postgres login for the runtime, a member of APP_ROLE, as the chart's docs ask for."""
    login, password = f"rt_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with psycopg.connect(shared_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(login), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(APP_ROLE),
                                                      sql.Identifier(login)))
    return postgres.dsn("tenantry", login, password)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------------- the test


@pytest.mark.timeout(600)
def test_operator_and_runtime_do_their_job_under_their_chart_identities(
        plane: ControlPlane, installed: Installed, shared_database: str, postgres: Postgres,
        redis_server: Redis, processes: list[Started], tmp_path: Path) -> None:
    operator_sa = next(d for d in installed.docs if d["kind"] == "ServiceAccount"
                       and d["metadata"]["namespace"] == RELEASE_NAMESPACE)
    runtime_sa = installed.find("ServiceAccount", "runtime")
    assert runtime_sa["metadata"]["namespace"] == RUNTIME_NAMESPACE
    operator_config = token_kubeconfig(plane, operator_sa, tmp_path / "operator.kubeconfig")
    runtime_config = token_kubeconfig(plane, runtime_sa, tmp_path / "runtime.kubeconfig")

    # The operator, as the chart runs it (leader election included), with the chart's settings.
    operator = start([sys.executable, "-m", "tenantry_operator"], chart_env(
        installed.operator(), KUBECONFIG=str(operator_config), POD_NAME="operator-under-test",
        TENANTRY_DATABASE_URL=shared_database, TENANTRY_REDIS_URL=redis_server.url,
        TENANTRY_HEALTH_PORT=str(free_port()), TENANTRY_RECONCILE_INTERVAL_SECONDS="5",
        TENANTRY_DATABASE_HOST_FOR_RUNTIME=f"127.0.0.1:{postgres.port}"),
        tmp_path / "operator.log")
    processes.append(operator)
    tenant = f"idt{uuid.uuid4().hex[:6]}"
    plan = next(d for d in installed.docs
                if d["kind"] == "TenantPlan" and d["metadata"]["name"] == "free")
    body = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant},
            "spec": {"planRef": {"name": "free"}, "isolation": "pool",
                     "apiKeys": [{"name": "web"}]}}
    plane.kubectl("apply", "-f", "-", input_text=json.dumps(body))
    try:
        wait_ready(plane, tenant, timeout=180)
    except AssertionError as err:
        raise AssertionError(f"{err}\noperator log:\n{operator.text()[-4000:]}") from None
    tenant_namespace = literal_env(installed.operator())["TENANTRY_NAMESPACE_PREFIX"] + tenant
    key_data = get_json(plane, "secret", "tenantry-api-keys", "-n", tenant_namespace)
    assert key_data, f"no key Secret in {tenant_namespace}"
    key = base64.b64decode(key_data["data"]["web"]).decode()

    # The runtime: the local Messages-API stub upstream, the price table from the chart's
    # ConfigMap, its own Postgres login, the tenant records through its token.
    stub_port, runtime_port = free_port(), free_port()
    processes.append(start([sys.executable, "-m", "tenantry_runtime.upstream_stub", "--port",
                            str(stub_port), "--api-key", STUB_KEY],
                           clean_env(), tmp_path / "stub.log"))
    prices = tmp_path / "prices.json"
    prices.write_text(installed.find("ConfigMap", "runtime")["data"]["prices.json"])
    runtime_deployment = installed.runtime()
    runtime = start([sys.executable, "-m", "tenantry_runtime", "--host", "127.0.0.1", "--port",
                     str(runtime_port)], chart_env(
        runtime_deployment, KUBECONFIG=str(runtime_config),
        TENANTRY_RUNTIME_KUBE_NAMESPACE=runtime_deployment["metadata"]["namespace"],
        TENANTRY_RUNTIME_REPLICA_NAME="runtime-under-test",
        TENANTRY_RUNTIME_REDIS_URL=redis_server.url,
        TENANTRY_RUNTIME_DATABASE_URL=runtime_login(shared_database, postgres),
        TENANTRY_RUNTIME_UPSTREAM_URL=f"http://127.0.0.1:{stub_port}",
        TENANTRY_RUNTIME_UPSTREAM_API_KEY=STUB_KEY,
        TENANTRY_RUNTIME_SPOOL_DIR=str(tmp_path / "spool"),
        TENANTRY_RUNTIME_PRICE_TABLE=str(prices)), tmp_path / "runtime.log")
    processes.append(runtime)
    url = f"http://127.0.0.1:{runtime_port}"
    try:
        wait_for("the runtime /readyz", lambda: ready(url), timeout=120)
    except AssertionError as err:
        raise AssertionError(f"{err}\nruntime log:\n{runtime.text()[-4000:]}") from None

    client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)

    def answered() -> anthropic.types.Message | None:
        try:
            return client.messages.create(
                model=plan["spec"]["model"], max_tokens=16,
                messages=[{"role": "user", "content": "hello from the chart identity test"}],
                extra_headers={"tenantry-rag": "off"})
        except anthropic.AuthenticationError:
            return None  # the watch has not brought the key yet

    reply = wait_for("the runtime to serve the tenant's key", answered, timeout=60)
    assert reply.usage.input_tokens > 0 and reply.content

    # Forbidden stays forbidden, asked of the API server with the same tokens.
    assert allowed(plane, runtime_config, "get", "secrets", "-n", RUNTIME_NAMESPACE)
    assert forbidden(plane, runtime_config, "get", "secrets", "-n", tenant_namespace)
    assert forbidden(plane, runtime_config, "get", "secrets", "-n", RELEASE_NAMESPACE)
    assert forbidden(plane, runtime_config, "get", "configmaps", "-n", RUNTIME_NAMESPACE)
    assert forbidden(plane, runtime_config, "delete", "secret",
                     f"tenantry-tenant-{tenant}", "-n", RUNTIME_NAMESPACE)
    assert forbidden(plane, runtime_config, "get", "tenants")
    assert forbidden(plane, operator_config, "delete", "tenantplan", "free")
    assert forbidden(plane, operator_config, "get", "pods", "-n", tenant_namespace)
    assert forbidden(plane, operator_config, "delete", "secret", "tenantry-api-keys", "-n",
                     tenant_namespace)
    assert forbidden(plane, operator_config, "create", "clusterrolebinding", "escalate",
                     "--clusterrole=cluster-admin", f"--user={tenant}")
    # Neither process was ever refused by the API server while doing its job.
    for proc in (operator, runtime):
        assert "Forbidden" not in proc.text() and " 403" not in proc.text(), proc.text()[-4000:]

    # Deletion under the operator's identity: namespace, records, and the runtime forgets it.
    plane.kubectl("delete", "tenant", tenant, "--wait=false")
    wait_for(f"tenant {tenant} gone", lambda: get_json(plane, "tenant", tenant) is None,
             timeout=120)
    wait_for("the runtime to refuse the deleted tenant's key",
             lambda: answered() is None, timeout=30)
