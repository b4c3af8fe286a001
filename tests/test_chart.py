"""The Helm chart: lint, render every ci/ values file, check the output, dry-run it on a server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import deep_merge
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator.settings import OperatorSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "tenantry"
BUILD_SCRIPT = REPO_ROOT / "tools" / "controlplane" / "build.sh"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "tenantry"
NAMESPACE = "tenantry-system"

Manifest = dict[str, Any]
Proc = subprocess.CompletedProcess[str]


# --------------------------------------------------------------------------------- helpers


# Named by `name=` so that other chart test modules can import it without shadowing warnings.
@pytest.fixture(scope="module", name="helm")
def helm_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The helm command from the control-plane cache, with its home dirs in a temp dir."""
    built = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                           check=False)
    assert built.returncode == 0, f"{BUILD_SCRIPT} failed:\n{built.stderr[-4000:]}"
    binary = Path(built.stdout.strip().splitlines()[-1]) / "helm"
    assert binary.is_file() and os.access(binary, os.X_OK), f"build.sh left no helm at {binary}"
    home = tmp_path_factory.mktemp("helm-home")
    saved = {k: os.environ.get(k) for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME",
                                            "HELM_DATA_HOME")}
    os.environ.update({k: str(home / k.lower()) for k in saved})
    try:
        yield [str(binary)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_helm(helm: list[str], *args: str) -> Proc:
    return subprocess.run([*helm, *args], capture_output=True, text=True, check=False,
                          timeout=120)


def render(helm: list[str], *args: str, release: str = RELEASE,
           namespace: str = NAMESPACE) -> list[Manifest]:
    """`helm template` output as parsed objects; fails the test on a render error."""
    result = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# The runtime, the evaluation mode's data stores and the TenantPlans have tests of their own
# (tests/test_chart_platform.py), as has the usage export (tests/test_chart_export.py); the
# tests here look at the operator's objects.
NOT_OPERATOR_COMPONENTS = {"runtime", "postgres", "redis", "usage-export"}


def operator_part(docs: list[Manifest]) -> list[Manifest]:
    return [d for d in docs if d["kind"] != "TenantPlan"
            and (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
            not in NOT_OPERATOR_COMPONENTS
            and "tenantry.dev/evaluation-only" not in (d["metadata"].get("labels") or {})]


def render_operator(helm: list[str], *args: str, release: str = RELEASE,
                    namespace: str = NAMESPACE) -> list[Manifest]:
    return operator_part(render(helm, *args, release=release, namespace=namespace))


def effective_values(values_file: Path | None) -> Manifest:
    """values.yaml with a ci/ file merged over it, as Helm coalesces them."""
    defaults: Manifest = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(defaults, yaml.safe_load(values_file.read_text()) if values_file else {})


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_container(docs: list[Manifest]) -> Manifest:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    container: Manifest = containers[0]
    return container


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: Manifest) -> tuple[str, str]:
    """(Secret name, key) of an env entry that must come from a Secret and nothing else."""
    assert "value" not in entry, f"{entry['name']} is a literal value"
    assert set(entry["valueFrom"]) == {"secretKeyRef"}, f"{entry['name']}: {entry['valueFrom']}"
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def fullname(docs: list[Manifest]) -> str:
    name: str = one(operator_part(docs), "Deployment")["metadata"]["name"]
    return name


# --------------------------------------------------------------------------------- chart files


def test_chart_crds_match_repository_crds() -> None:
    top = sorted(p.name for p in (REPO_ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert top and chart == top
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (REPO_ROOT / "crds" / name).read_bytes(), (
            f"charts/tenantry/crds/{name} drifted from crds/{name}; copy it over")


def test_schema_closes_every_object() -> None:
    """additionalProperties: false everywhere, except string maps (labels), maps of a closed
    definition (plans, prices) and Helm's global."""

    def walk(node: Manifest, path: str) -> Iterator[str]:
        extra = node.get("additionalProperties")
        closed = extra is False or extra == {"type": "string"} or (
            isinstance(extra, dict) and set(extra) == {"$ref"})
        if node.get("type") == "object" and path != "$.global" and not closed:
            yield path
        for key, child in (node.get("properties") or {}).items():
            yield from walk(child, f"{path}.{key}")
        for key, child in (node.get("definitions") or {}).items():
            yield from walk(child, f"#/definitions/{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert list(walk(schema, "$")) == []
    refs = set(re.findall(r'"\$ref": "#/definitions/([A-Za-z]+)"', json.dumps(schema)))
    assert refs == set(schema["definitions"])  # each definition is used, and exists
    # Every value in values.yaml is described by the schema (and the other way around).
    assert set(schema["properties"]) - {"global"} == set(effective_values(None))


def test_ci_values_files_exist() -> None:
    assert {p.name for p in CI_VALUES} >= {"default-values.yaml", "existing-secrets-values.yaml",
                                           "custom-values.yaml"}


# --------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values_file", [None, *CI_VALUES],
                         ids=lambda p: p.stem if p else "no-values")
def test_lint_is_clean(helm: list[str], values_file: Path | None) -> None:
    args = ["-f", str(values_file)] if values_file else []
    result = run_helm(helm, "lint", "--strict", str(CHART), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


# --------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_ci_values_render_the_settings(helm: list[str], values_file: Path) -> None:
    docs = render_operator(helm, "-f", str(values_file))
    values = effective_values(values_file)
    container = operator_container(docs)
    env = env_of(container)
    silo = values["silo"]["image"]
    assert env["TENANTRY_SILO_IMAGE"]["value"] == f"{silo['repository']}:{silo['tag']}"
    tag = values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container["image"] == f"{values['image']['repository']}:{tag}"
    literal = {name: e["value"] for name, e in env.items() if "value" in e}
    assert literal["TENANTRY_WORKER_LIMIT"] == str(values["workerLimit"])
    assert literal["TENANTRY_NAMESPACE_PREFIX"] == values["namespacePrefix"]
    assert literal["TENANTRY_RUNTIME_NAMESPACE"] == values["runtimeNamespace"]["name"]
    assert literal["TENANTRY_POOL_INDEX_STRATEGY"] == values["poolIndexStrategy"]
    # Evaluation mode: the bundled Postgres's Service, whatever hostForRuntime says.
    host = (f"{fullname(docs)}-postgres.{NAMESPACE}.svc:5432" if values["evaluation"]["enabled"]
            else values["database"]["hostForRuntime"])
    assert literal["TENANTRY_DATABASE_HOST_FOR_RUNTIME"] == host
    # Every TENANTRY_* variable is a real operator setting, and the literal ones parse.
    fields = {f"TENANTRY_{name.upper()}" for name in OperatorSettings.model_fields}
    assert {n for n in env if n.startswith("TENANTRY_")} <= fields
    parsed = OperatorSettings.model_validate(  # a list setting is JSON, as pydantic reads env
        {name.removeprefix("TENANTRY_").lower(): json.loads(value) if value[:1] == "[" else value
         for name, value in literal.items() if name.startswith("TENANTRY_")})
    assert list(parsed.cluster_cidrs) == values["clusterCIDRs"]
    assert parsed.silo_image == literal["TENANTRY_SILO_IMAGE"]
    assert parsed.worker_limit == values["workerLimit"]
    assert parsed.reconcile_interval_seconds == values["reconcileIntervalSeconds"]
    # Leader election: this release's Lease in the release namespace, the Pod's name as holder.
    lease = values["leaderElection"]
    assert (parsed.lease_name, parsed.lease_namespace) == (fullname(docs), NAMESPACE)
    assert parsed.lease_duration_seconds == lease["leaseDurationSeconds"]
    assert parsed.lease_renew_deadline_seconds == lease["renewDeadlineSeconds"]
    assert parsed.lease_retry_period_seconds == lease["retryPeriodSeconds"]
    assert parsed.health_port == values["livenessPort"]
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_connection_strings_come_from_secrets(helm: list[str], values_file: Path) -> None:
    docs = render_operator(helm, "-f", str(values_file))
    values = effective_values(values_file)
    env = env_of(operator_container(docs))
    chart_secret = [d for d in docs if d["kind"] == "Secret"]
    for setting, conn, chart_key in (("TENANTRY_DATABASE_URL", values["database"], "database-url"),
                                     ("TENANTRY_REDIS_URL", values["redis"], "redis-url")):
        if values["evaluation"]["enabled"]:
            assert secret_ref(env[setting]) == (f"{fullname(docs)}-evaluation", chart_key)
        elif conn["existingSecret"]:
            assert secret_ref(env[setting]) == (conn["existingSecret"], conn["existingSecretKey"])
        else:
            assert secret_ref(env[setting]) == (fullname(docs), chart_key)
            assert chart_secret[0]["stringData"][chart_key] == conn["url"]
    if values["silo"]["dsnOverrides"]:
        _, key = secret_ref(env["TENANTRY_SILO_DSN_OVERRIDES"])
        assert json.loads(chart_secret[0]["stringData"][key]) == values["silo"]["dsnOverrides"]
    # No ConfigMap at all, and no connection string outside the chart's own Secret.
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for url in (values["database"]["url"], values["redis"]["url"],
                *values["silo"]["dsnOverrides"].values()):
        if url:
            assert url not in others
    if chart_secret:
        pod = one(docs, "Deployment")["spec"]["template"]["metadata"]
        assert pod["annotations"]["checksum/secret"]


def test_existing_secrets_create_no_secret(helm: list[str]) -> None:
    docs = render_operator(helm, "-f", str(CHART / "ci" / "existing-secrets-values.yaml"))
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_of(operator_container(docs))
    assert secret_ref(env["TENANTRY_DATABASE_URL"]) == ("tenantry-connections", "postgres-dsn")
    assert secret_ref(env["TENANTRY_REDIS_URL"]) == ("tenantry-connections", "redis-url")


def test_defaults_render_without_connection_strings(helm: list[str]) -> None:
    """No database configured: no Secret and no URL env; the operator reports the condition."""
    docs = render_operator(helm)
    env = env_of(operator_container(docs))
    assert "TENANTRY_DATABASE_URL" not in env and "TENANTRY_REDIS_URL" not in env
    assert env["TENANTRY_SILO_IMAGE"]["value"] == "pgvector/pgvector:0.8.1-pg18"
    assert operator_container(docs)["image"] == "ghcr.io/tenantry/operator:0.1.0"
    assert not [d for d in docs if d["kind"] == "Secret"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # The Lease, not the rollout strategy, keeps an old and a new Pod from reconciling at once.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    # The runtime has a namespace of its own (it may read every Secret there), which the chart
    # creates; not when it is the release namespace.
    assert one(docs, "Namespace")["metadata"]["name"] == "tenantry-runtime"
    assert not [d for d in render_operator(helm, namespace="tenantry-runtime")
                if d["kind"] == "Namespace"]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_pod_is_restricted_and_probed(helm: list[str], values_file: Path) -> None:
    docs = render_operator(helm, "-f", str(values_file))
    values = effective_values(values_file)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"]
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc and "add" not in sc["capabilities"]
    assert container["resources"] == values["resources"]
    port = values["livenessPort"]
    # The leader-electing entry point, which serves /healthz on leader and standbys alike.
    assert container["command"] == ["python", "-m", "tenantry_operator"]
    assert "args" not in container
    assert env_of(container)["TENANTRY_HEALTH_PORT"]["value"] == str(port)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == port
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_cluster_role_is_least_privilege(helm: list[str], values_file: Path) -> None:
    docs = render_operator(helm, "-f", str(values_file))
    role = one(docs, "ClusterRole")
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
    assert "patch" in grants[("tenantry.dev", "tenants/status")]
    assert grants[("tenantry.dev", "tenants")] == {"get", "list", "watch", "patch"}
    assert grants[("tenantry.dev", "tenantplans")] == {"get", "list", "watch"}
    assert grants[("", "events")] == {"create"}
    assert grants[("apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    assert "delete" in grants[("", "namespaces")]
    assert grants[("", "persistentvolumeclaims")] == {"list", "patch", "delete"}
    assert "delete" not in grants[("", "secrets")]  # only in the release namespace (Role)
    # list/watch: the labelled dedicated endpoint Secrets (operator/endpoint_secrets.py).
    assert grants[("", "secrets")] == {"get", "list", "watch", "create", "patch"}
    assert ("", "pods") not in grants
    assert ("rbac.authorization.k8s.io", "clusterroles") not in grants
    # kopf runs standalone: no peering objects; the Lease is granted by a namespaced Role.
    assert not [key for key in grants if key[0] in {"kopf.dev", "coordination.k8s.io"}]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = one(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": NAMESPACE}]


@pytest.mark.parametrize(("name", "length"), [("operators-of-tenantry", 63),
                                               ("operator-of-tenantry", 62)],
                         ids=["cut-at-63", "cut-then-trailing-dash-dropped"])
def test_long_release_name_is_truncated_to_63(helm: list[str], name: str, length: int) -> None:
    release = "r" * 50 + "-xy"  # 53 characters, Helm's limit for release names
    docs = render(helm, "--set", f"nameOverride={name}", "-f",
                  str(CHART / "ci" / "default-values.yaml"), release=release)
    expected = f"{release}-{name}"[:63].rstrip("-")
    assert fullname(docs) == expected and len(expected) == length
    for doc in docs:
        meta = doc["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        for value in (meta.get("labels") or {}).values():
            assert len(value) <= 63, (meta["name"], value)
    deployment = one(operator_part(docs), "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": name,
                        "app.kubernetes.io/instance": release}
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert one(operator_part(docs), "ClusterRoleBinding")["subjects"][0]["name"] == expected


def test_two_replicas_elect_a_leader_through_a_lease(helm: list[str]) -> None:
    """replicaCount 2 is the documented HA setup: Lease RBAC, and no kopf peering anywhere."""
    docs = render_operator(helm, "--set", "replicaCount=2", "--set",
                           f"runtimeNamespace.name={NAMESPACE}", "-f",
                           str(CHART / "ci" / "default-values.yaml"))
    name = fullname(docs)
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [name], "verbs": ["get", "update"]},
        # Credential copies, and the runtime records (the runtime namespace is this one here).
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["delete"]},
    ]
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name,
                                    "namespace": NAMESPACE}]
    env = env_of(operator_container(docs))
    assert env["TENANTRY_LEASE_NAME"]["value"] == name
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "peering" not in yaml.safe_dump_all(docs).lower()


# --------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "workerLimt=3"], "workerLimt"),
    (["--set", "database.existingSecrt=db"], "existingSecrt"),
    (["--set", "silo.image.tga=pg17"], "tga"),
    (["--set", "resources.limits.memroy=1Gi"], "memroy"),
    (["--set", "workerLimit=0"], "workerLimit"),
    (["--set", "poolIndexStrategy=global"], "poolIndexStrategy"),
    (["--set", "namespacePrefix=Tenant_"], "namespacePrefix"),
    (["--set", "database.url=mysql://x"], "url"),
    (["--set", "peering=true"], "peering"),
    (["--set", "leaderElection.leaseDurationSeconds=7.5"], "leaseDurationSeconds"),
], ids=["typo-top", "typo-nested", "typo-deep", "typo-resources", "range", "enum", "pattern",
        "scheme", "peering-removed", "lease-whole-seconds"])
def test_schema_rejects_bad_values(helm: list[str], args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"{args} rendered:\n{result.stdout[:2000]}"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "database.url=postgresql://a@b/c", "--set", "database.existingSecret=db"],
     "set either database.url or database.existingSecret, not both"),
    (["--set", "leaderElection.renewDeadlineSeconds=30"],
     "retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds must hold"),
    (["--set", "leaderElection.retryPeriodSeconds=20"],
     "retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds must hold"),
], ids=["url-and-secret", "deadline-not-below-duration", "retry-not-below-deadline"])
def test_template_rejects_contradictions(helm: list[str], args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --------------------------------------------------------------------------------- API server


def kubectl_input(docs: list[Manifest]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_rendered_manifests_pass_server_dry_run(helm: list[str], control_plane: ControlPlane,
                                                values_file: Path) -> None:
    """The API server accepts every object, and Pod Security `restricted` raises no warning."""
    namespace = f"chart-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.kubectl("label", "namespace", namespace,
                          "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/warn=restricted")
    # A dry run creates no namespace: the runtime's must exist for the Role the chart puts in
    # it. A name of this test's own, so no other test (helm install) finds it in its way.
    runtime_namespace = f"{namespace}-rt"
    control_plane.kubectl("create", "namespace", runtime_namespace)
    # The runtime's Pods run there: the same Pod Security check as the chart's Namespace asks.
    control_plane.kubectl("label", "namespace", runtime_namespace,
                          "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/warn=restricted")
    try:
        docs = render(helm, "-f", str(values_file), "--set",
                      f"runtimeNamespace.name={runtime_namespace}", release=namespace,
                      namespace=namespace)
        result = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                                       input_text=kubectl_input(docs))
        assert "PodSecurity" not in result.stderr, result.stderr
        assert result.stdout.count("serverside-applied (server dry run)") == len(docs)
    finally:
        control_plane.kubectl("delete", "namespace", namespace, runtime_namespace, "--wait=false")


def test_service_account_can_do_what_the_operator_does(helm: list[str],
                                                       control_plane: ControlPlane) -> None:
    """Install the RBAC objects for real, then act as the ServiceAccount with server-side apply."""
    namespace = f"chart-{uuid.uuid4().hex[:8]}"
    runtime_namespace = f"{namespace}-rt"
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.kubectl("create", "namespace", runtime_namespace)
    docs = render_operator(helm, "-f", str(CHART / "ci" / "default-values.yaml"), "--set",
                           f"runtimeNamespace.name={runtime_namespace}", release=namespace,
                           namespace=namespace)
    rbac = [d for d in docs if d["kind"] in {"ServiceAccount", "ClusterRole",
                                             "ClusterRoleBinding", "Role", "RoleBinding"}]
    control_plane.kubectl("apply", "--server-side", "-f", "-", input_text=kubectl_input(rbac))
    account = f"system:serviceaccount:{namespace}:{one(docs, 'ServiceAccount')['metadata']['name']}"
    try:
        def can(verb: str, resource: str, *extra: str) -> bool:
            out = control_plane.kubectl("auth", "can-i", verb, resource, f"--as={account}",
                                        *extra, check=False)
            answer: str = out.stdout
            return answer.strip() == "yes"

        assert can("patch", "tenants.tenantry.dev", "--subresource=status")
        assert can("watch", "tenants.tenantry.dev")
        assert can("create", "events", "-n", "default")
        assert can("delete", "persistentvolumeclaims", "-n", "tenant-x")
        assert can("patch", "persistentvolumeclaims", "-n", "tenant-x")
        assert can("get", "storageclasses.storage.k8s.io")
        # The operator's caches (cache.py) list and watch what it creates, cluster-wide.
        for kind in ("secrets", "configmaps", "resourcequotas", "limitranges", "serviceaccounts",
                     "networkpolicies.networking.k8s.io", "namespaces",
                     "tenantplans.tenantry.dev"):
            assert can("watch", kind, "--all-namespaces")
        assert can("delete", "secrets", "-n", namespace)  # credential copies
        # The runtime records of deleted tenants (docs/api-keys.md).
        assert can("delete", "secrets", "-n", runtime_namespace)
        assert can("patch", "secrets", "-n", runtime_namespace)
        assert not can("delete", "secrets", "-n", "tenant-x")
        assert not can("delete", "tenants.tenantry.dev")
        assert not can("patch", "tenantplans.tenantry.dev")
        assert not can("create", "pods", "-n", "tenant-x")
        assert not can("update", "secrets", "-n", "tenant-x")
        assert not can("create", "clusterroles.rbac.authorization.k8s.io")
        # Guardrails: no Role or RoleBinding is ever created for the tenant's ServiceAccount.
        assert not can("create", "rolebindings.rbac.authorization.k8s.io", "-n", "tenant-x")
        # Leader election: its own Lease in the release namespace, nothing else.
        own_role = [d for d in docs if d["kind"] == "Role"
                    and d["metadata"]["namespace"] == namespace]
        lease = f"leases.coordination.k8s.io/{one(own_role, 'Role')['metadata']['name']}"
        assert can("create", "leases.coordination.k8s.io", "-n", namespace)
        assert can("get", lease, "-n", namespace)
        assert can("update", lease, "-n", namespace)
        assert not can("update", "leases.coordination.k8s.io/other", "-n", namespace)
        assert not can("delete", lease, "-n", namespace)
        assert not can("get", lease, "-n", "kube-system")
        # The operator's own calls: server-side apply of a new Namespace and namespaced objects.
        labels = {"tenantry.dev/tenant": "chartprobe"}
        objects: list[Manifest] = [
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": f"{namespace}-tenant", "labels": labels}},
            *({"apiVersion": "v1", "kind": kind, "metadata": {"name": "probe",
                                                              "namespace": namespace}, **body}
              for kind, body in (("Secret", {"stringData": {"password": "x"}}),
                                 ("ConfigMap", {"data": {"config.json": "{}"}}),
                                 ("Service", {"spec": {"ports": [{"port": 5432}]}}))),
            {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
             "metadata": {"name": "probe", "namespace": namespace},
             "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}}},
            # The guardrails of a tenant namespace (guardrails.py).
            *({"apiVersion": api, "kind": kind, "metadata": {"name": "probe",
                                                             "namespace": namespace}, **body}
              for api, kind, body in (
                  ("v1", "ResourceQuota", {"spec": {"hard": {"pods": "1"}}}),
                  ("v1", "LimitRange", {"spec": {"limits": [
                      {"type": "Container", "max": {"cpu": "1"}}]}}),
                  ("v1", "ServiceAccount", {"automountServiceAccountToken": False}),
                  ("networking.k8s.io/v1", "NetworkPolicy", {"spec": {"podSelector": {}}}))),
        ]
        result = control_plane.kubectl("apply", "--server-side", "--dry-run=server",
                                       "--field-manager=tenantry-operator", f"--as={account}",
                                       "-f", "-", input_text=kubectl_input(objects),
                                       check=False)
        assert result.returncode == 0, result.stderr
    finally:
        control_plane.kubectl("delete", "-f", "-", "--wait=false", input_text=kubectl_input(
            [d for d in rbac if d["kind"] != "ServiceAccount"]), check=False)
        control_plane.kubectl("delete", "namespace", namespace, runtime_namespace,
                              "--wait=false")


@pytest.mark.parametrize(("values_file", "warned"), [
    (None, True), (CHART / "ci" / "existing-secrets-values.yaml", False)],
    ids=["no-values", "existing-secrets"])
def test_helm_install_dry_run_prints_notes(helm: list[str], control_plane: ControlPlane,
                                           values_file: Path | None, warned: bool) -> None:
    """Helm's own install path against the server; NOTES warn when no data plane is set."""
    namespace = f"chart-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", namespace)
    try:
        args = ["-f", str(values_file)] if values_file else []
        result = run_helm(helm, "install", "tenantry", str(CHART), "--dry-run=server",
                          # The session's operator tests applied the example plans
                          # with kubectl: a real install would adopt them the same way.
                          "--take-ownership",
                          f"--kubeconfig={control_plane.kubeconfig}", "--namespace", namespace,
                          *args)
        assert result.returncode == 0, result.stderr
        notes = result.stdout.split("NOTES:", 1)[1]
        assert f"kubectl -n {namespace} rollout status deployment/tenantry" in notes
        assert ("WARNING: no database configured" in notes) is warned
        assert ("WARNING: no Redis configured" in notes) is warned
        assert "kubectl apply --server-side -f" in notes
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
