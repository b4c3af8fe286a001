"""The chart's platform half, rendered: the runtime, TenantPlans and the price table as values,
the evaluation mode's Postgres and Redis, and what the schema and the templates refuse.
(The operator's objects: tests/test_chart.py; on a real API server: test_chart_identity.py.)"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml
from tenantry_devenv.controlplane import ControlPlane
from tenantry_runtime.pricing import load_price_book
from tenantry_runtime.settings import RuntimeSettings
from test_chart import (  # noqa: F401 - helm_fixture: the `helm` fixture
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    Manifest,
    effective_values,
    env_of,
    helm_fixture,
    operator_part,
    render,
    run_helm,
    secret_ref,
)

RUNTIME_SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                         "app.kubernetes.io/component"}


def of_component(docs: list[Manifest], kind: str, component: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (d["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") == component]


def only(docs: list[Manifest], kind: str, component: str) -> Manifest:
    found = of_component(docs, kind, component)
    assert len(found) == 1, (kind, component, [d["metadata"]["name"] for d in found])
    return found[0]


def closed_schema(node: Manifest) -> Manifest:
    """A CRD's structural schema as a strict JSON schema: every object closed, no defaults, no
    x-kubernetes-* (the API server applies those)."""
    out: Manifest = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "default":
            continue
        if key == "properties":
            out[key] = {name: closed_schema(child) for name, child in value.items()}
        elif key == "items":
            out[key] = closed_schema(value)
        else:
            out[key] = value
    if node.get("type") == "object":
        out["additionalProperties"] = False
    return out


# --------------------------------------------------------------------------------- values = data


def test_plans_are_the_examples_and_their_schema_is_the_crds() -> None:
    values = effective_values(None)
    examples = {d["metadata"]["name"]: d["spec"]
                for d in yaml.safe_load_all((REPO_ROOT / "examples" / "plans.yaml").read_text())
                if d}
    assert values["tenantPlans"]["plans"] == examples
    crd = yaml.safe_load((CHART / "crds" / "tenantry.dev_tenantplans.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["definitions"]["tenantPlanSpec"] == closed_schema(spec), (
        "values.schema.json definitions.tenantPlanSpec drifted from the TenantPlan CRD")


def test_rendered_plans_keep_on_uninstall(helm: list[str]) -> None:
    docs = render(helm)
    plans = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TenantPlan"}
    assert {name: p["spec"] for name, p in plans.items()} == (
        effective_values(None)["tenantPlans"]["plans"])
    for plan in plans.values():
        assert "namespace" not in plan["metadata"]  # cluster-scoped
        assert plan["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    fewer = render(helm, "--set", "tenantPlans.plans.free=null")
    assert sorted(d["metadata"]["name"] for d in fewer if d["kind"] == "TenantPlan") == [
        "enterprise", "pro"]
    assert not [d for d in render(helm, "--set", "tenantPlans.create=false")
                if d["kind"] == "TenantPlan"]


def test_price_table_is_the_shipped_one_and_loads(helm: list[str], tmp_path: Path) -> None:
    shipped = REPO_ROOT / "runtime" / "tenantry_runtime" / "prices.json"
    assert effective_values(None)["runtime"]["prices"] == json.loads(shipped.read_text())
    docs = render(helm)
    table = tmp_path / "prices.json"
    table.write_text(only(docs, "ConfigMap", "runtime")["data"]["prices.json"])
    assert load_price_book(table) == load_price_book(None)
    # A changed price rolls the runtime Pods.
    prices = json.loads(shipped.read_text())
    prices["versions"][0]["models"]["claude-stub-1"]["input"] = "9.50"
    raised = tmp_path / "raised.yaml"
    raised.write_text(yaml.safe_dump({"runtime": {"prices": prices}}))
    changed = render(helm, "-f", str(raised))
    annotation = "checksum/prices"
    pod_annotations = [only(d, "Deployment", "runtime")["spec"]["template"]["metadata"][
        "annotations"][annotation] for d in (docs, changed)]
    assert pod_annotations[0] != pod_annotations[1]


# --------------------------------------------------------------------------------- the runtime


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_runtime_renders_per_values_file(helm: list[str], values_file: Path) -> None:
    docs = render(helm, "-f", str(values_file))
    values = effective_values(values_file)
    rt = values["runtime"]
    runtime_objects = [d for d in docs if (d["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") == "runtime"]
    if not rt["enabled"]:
        assert not runtime_objects
        return
    namespace = values["runtimeNamespace"]["name"]
    assert {d["metadata"].get("namespace") for d in runtime_objects} == {namespace}
    deployment = only(docs, "Deployment", "runtime")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert set(selector) == RUNTIME_SELECTOR_KEYS and selector.items() <= labels.items()
    # The operator's Deployment never selects a runtime Pod (and the other way around).
    operator = next(d for d in operator_part(docs) if d["kind"] == "Deployment")
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not selector.items() <= operator["spec"]["template"]["metadata"]["labels"].items()
    spec = pod["spec"]
    [container] = spec["containers"]
    # One uvicorn worker per container (python -m tenantry_runtime has no --workers), one CPU.
    assert container["command"] == ["python", "-m", "tenantry_runtime"]
    assert "--workers" not in container["args"]
    assert container["resources"] == rt["resources"]
    assert "cpu" not in container["resources"].get("limits", {})
    assert container["image"].startswith(rt["image"]["repository"] + ":")
    # Probes on the API port: liveness /healthz, readiness /readyz on the tenant records only
    # (tests/test_runtime_readiness.py: what the runtime answers there).
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", rt["port"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz/local", "port": "http"}
    # Restricted Pod Security, read-only root filesystem with writable /tmp and spool.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == rt["podSecurityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = env_of(container)
    assert "emptyDir" in volumes[mounts[env["TENANTRY_RUNTIME_SPOOL_DIR"]["value"]]]
    prices_dir = str(Path(env["TENANTRY_RUNTIME_PRICE_TABLE"]["value"]).parent)
    prices_map = volumes[mounts[prices_dir]]["configMap"]["name"]
    assert only(docs, "ConfigMap", "runtime")["metadata"]["name"] == prices_map
    assert spec["serviceAccountName"] == only(docs, "ServiceAccount", "runtime")["metadata"][
        "name"]
    # Every variable is a runtime setting; the literal ones parse; secrets only by reference.
    fields = {f"TENANTRY_RUNTIME_{name.upper()}" for name in RuntimeSettings.model_fields}
    assert {n for n in env if n.startswith("TENANTRY_")} <= fields
    literal = {n.removeprefix("TENANTRY_RUNTIME_").lower(): e["value"] for n, e in env.items()
               if "value" in e and n.startswith("TENANTRY_RUNTIME_")}
    settings = RuntimeSettings.model_validate(literal)
    assert settings.config_source == "kubernetes"
    assert env["TENANTRY_RUNTIME_KUBE_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    autoscaling = rt["autoscaling"]
    assert settings.expected_replicas == (
        autoscaling["maxReplicas"] if autoscaling["enabled"] else rt["replicaCount"])
    for name in ("DATABASE_URL", "REDIS_URL", "UPSTREAM_API_KEY", "METRICS_TOKEN",
                 "EMBEDDINGS_API_KEY"):
        if f"TENANTRY_RUNTIME_{name}" in env:
            secret_ref(env[f"TENANTRY_RUNTIME_{name}"])
    secrets = [d for d in docs if d["kind"] == "Secret"]
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for secret in secrets:
        for value in (secret.get("stringData") or {}).values():
            assert value not in others or len(value) < 8, secret["metadata"]["name"]
    # Topology spread over zones and nodes, on the runtime's own Pods.
    if rt["topologySpread"]["enabled"]:
        keys = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
        assert set(keys) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in keys.values():
            assert constraint["labelSelector"]["matchLabels"] == selector
            assert constraint["whenUnsatisfiable"] == rt["topologySpread"]["whenUnsatisfiable"]
    # Service, HPA, PDB and NetworkPolicy all aim at these Pods.
    service = only(docs, "Service", "runtime")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = of_component(docs, "HorizontalPodAutoscaler", "runtime")
    if autoscaling["enabled"]:
        assert "replicas" not in deployment["spec"]
        assert hpa[0]["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "name": deployment["metadata"]["name"]}
        assert (hpa[0]["spec"]["minReplicas"], hpa[0]["spec"]["maxReplicas"]) == (
            autoscaling["minReplicas"], autoscaling["maxReplicas"])
    else:
        assert not hpa and deployment["spec"]["replicas"] == rt["replicaCount"]
    if rt["podDisruptionBudget"]["enabled"]:
        pdb = only(docs, "PodDisruptionBudget", "runtime")
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        assert pdb["spec"]["maxUnavailable"] == rt["podDisruptionBudget"]["maxUnavailable"]
    if rt["networkPolicy"]["enabled"]:
        policy = only(docs, "NetworkPolicy", "runtime")
        assert policy["spec"]["podSelector"]["matchLabels"] == selector
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        [ingress] = policy["spec"]["ingress"]
        assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
        assert ingress.get("from", []) == rt["networkPolicy"]["ingressFrom"]
        egress = policy["spec"]["egress"]
        assert egress[0] == {"ports": rt["networkPolicy"]["egressPorts"]}
        assert egress[1:] == rt["networkPolicy"]["extraEgress"]


def test_runtime_role_reads_secrets_of_its_own_namespace_only(helm: list[str]) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "default-values.yaml"))
    account = only(docs, "ServiceAccount", "runtime")["metadata"]
    role = only(docs, "Role", "runtime")
    binding = only(docs, "RoleBinding", "runtime")
    assert account["namespace"] == role["metadata"]["namespace"] == "tenantry-runtime"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "verbs": ["get", "list", "watch"]}]
    assert binding["metadata"]["namespace"] == account["namespace"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]
    # No cluster-wide grant names the runtime's account.
    for crb in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        assert account["name"] not in {s["name"] for s in crb["subjects"]}


def test_runtime_secret_copies_what_the_runtime_namespace_lacks(helm: list[str]) -> None:
    """The operator's Redis URL given as a value is copied into the runtime's namespace; the
    admin DSN never is (the runtime logs in with its own login)."""
    docs = render(helm, "-f", str(CHART / "ci" / "default-values.yaml"),
                  "--set", "runtime.upstream.apiKey=sk-ant-test-0123456789")
    values = effective_values(CHART / "ci" / "default-values.yaml")
    secret = only(docs, "Secret", "runtime")
    assert secret["metadata"]["namespace"] == "tenantry-runtime"
    assert secret["stringData"] == {"redis-url": values["redis"]["url"],
                                    "upstream-api-key": "sk-ant-test-0123456789"}
    env = env_of(only(docs, "Deployment", "runtime")["spec"]["template"]["spec"]["containers"][0])
    name = secret["metadata"]["name"]
    assert secret_ref(env["TENANTRY_RUNTIME_REDIS_URL"]) == (name, "redis-url")
    assert secret_ref(env["TENANTRY_RUNTIME_UPSTREAM_API_KEY"]) == (name, "upstream-api-key")
    assert "TENANTRY_RUNTIME_DATABASE_URL" not in env
    assert values["database"]["url"] not in yaml.safe_dump_all(
        [d for d in docs if d["metadata"].get("namespace") == "tenantry-runtime"])


def test_external_values_take_every_credential_from_the_users_secrets(helm: list[str]) -> None:
    values_file = CHART / "ci" / "external-values.yaml"
    docs = render(helm, "-f", str(values_file))
    values = effective_values(values_file)["runtime"]
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_of(only(docs, "Deployment", "runtime")["spec"]["template"]["spec"]["containers"][0])
    for variable, conn in (("DATABASE_URL", values["database"]), ("REDIS_URL", values["redis"]),
                           ("UPSTREAM_API_KEY", values["upstream"]),
                           ("METRICS_TOKEN", values["metricsToken"])):
        assert secret_ref(env[f"TENANTRY_RUNTIME_{variable}"]) == (
            conn["existingSecret"], conn["existingSecretKey"])
    for name, value in values["env"].items():
        assert env[name]["value"] == value
    assert env["TENANTRY_RUNTIME_EMBEDDINGS_DIMENSIONS"]["value"] == "384"


# --------------------------------------------------------------------------------- evaluation


def test_evaluation_mode_wires_both_halves_to_the_bundled_stores(helm: list[str]) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "evaluation-values.yaml"))
    full = next(d for d in operator_part(docs) if d["kind"] == "Deployment")["metadata"]["name"]
    generated = next(d for d in docs if d["kind"] == "Secret"
                     and d["metadata"]["name"] == f"{full}-evaluation")["stringData"]
    runtime_secret = only(docs, "Secret", "runtime")["stringData"]
    pg_host = f"{full}-postgres.{NAMESPACE}.svc:5432"
    # One set of generated passwords, the same wherever it is used (one render).
    assert generated["database-url"] == (
        f"postgresql://postgres:{generated['postgres-password']}@{pg_host}/tenantry")
    assert runtime_secret["database-url"] == (
        f"postgresql://tenantry_runtime:{generated['runtime-password']}@{pg_host}/tenantry")
    assert runtime_secret["redis-url"] == generated["redis-url"] == (
        f"redis://:{generated['redis-password']}@{full}-redis.{NAMESPACE}.svc:6379/0")
    assert f"requirepass {generated['redis-password']}\n" in generated["redis.conf"]
    assert "appendonly yes" in generated["redis.conf"]
    assert len({generated[k] for k in ("postgres-password", "runtime-password",
                                       "redis-password")}) == 3
    # The passwords are in Secrets only (the init script reads the runtime's from the env).
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for key in ("postgres-password", "runtime-password", "redis-password"):
        assert generated[key] not in others
    init = only(docs, "ConfigMap", "postgres")["data"]
    assert "GRANT tenantry_app TO tenantry_runtime" in "".join(init.values())
    for what, port in (("postgres", 5432), ("redis", 6379)):
        statefulset = only(docs, "StatefulSet", what)
        pod = statefulset["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        [container] = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == (
            "Retain")
        service = only(docs, "Service", what)
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
        assert statefulset["metadata"]["labels"]["tenantry.dev/evaluation-only"] == "true"
    redis = only(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"] == ["redis-server", "/etc/redis/redis.conf"]  # no password in argv


def test_evaluation_is_off_by_default(helm: list[str]) -> None:
    docs = render(helm)
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    assert not [d for d in docs if "tenantry.dev/evaluation-only" in (
        d["metadata"].get("labels") or {})]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_long_release_names_fit_everywhere(helm: list[str], values_file: Path) -> None:
    release = "r" * 50 + "-xy"
    for doc in render(helm, "-f", str(values_file), release=release):
        meta = doc["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        for value in (meta.get("labels") or {}).values():
            assert len(value) <= 63, (meta["name"], value)


# --------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "runtime.replicas=3"], "replicas"),
    (["--set", "runtime.autoscaling.maxReplica=3"], "maxReplica"),
    (["--set", "runtime.env.PATH=/x"], "PATH"),
    (["--set", "runtime.env.TENANTRY_RUNTIME_MAX_IN_FLIGHT=5"], "TENANTRY_RUNTIME_MAX_IN_FLIGHT"),
    (["--set", "runtime.upstream.url=ftp://x"], "url"),
    (["--set", "runtime.prices.versions[0].models.m.input=cheap"], "input"),
    (["--set", "runtime.prices.versions[0].models.m.inptu=1"], "inptu"),
    (["--set", "tenantPlans.plans.gold.modle=x"], "modle"),
    (["--set", "tenantPlans.plans.Gold.model=x"], "Gold"),
    (["--set", "tenantPlans.plans.gold.model=x", "--set",
      "tenantPlans.plans.gold.allowedIsolation={cluster}"], "allowedIsolation"),
    (["--set", "evaluation.postgres.storage=lots"], "storage"),
    (["--set", "runtime.networkPolicy.ingressFrom[0].podSelectr.a=b"], "podSelectr"),
], ids=["typo-runtime", "typo-nested", "env-not-runtime", "env-not-string", "scheme",
        "price-not-decimal", "price-typo", "plan-typo", "plan-name", "plan-enum",
        "quantity", "peer-typo"])
def test_schema_rejects_bad_platform_values(helm: list[str], args: list[str],
                                            message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"{args} rendered:\n{result.stdout[:2000]}"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "redis.existingSecret=r"],
     "runtime.redis.existingSecret: the runtime runs in namespace tenantry-runtime"),
    (["--set", "evaluation.enabled=true", "--set", "database.url=postgresql://a@b/c"],
     "evaluation.enabled bundles Postgres and Redis"),
    (["--set", "runtime.autoscaling.minReplicas=5", "--set",
      "runtime.autoscaling.maxReplicas=2"], "minReplicas must not exceed maxReplicas"),
    (["--set", "runtime.env.TENANTRY_RUNTIME_REDIS_URL=redis://x", "--set",
      "redis.url=redis://y"], "set by the chart from a Secret"),
    (["--set", "runtime.upstream.apiKey=k", "--set", "runtime.upstream.existingSecret=s"],
     "runtime.upstream: set either apiKey or existingSecret"),
], ids=["redis-secret-elsewhere", "evaluation-and-external", "hpa-range", "env-secret",
        "key-and-secret"])
def test_template_rejects_platform_contradictions(helm: list[str], args: list[str],
                                                  message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_redis_secret_is_shared_when_the_runtime_shares_the_namespace(helm: list[str]) -> None:
    docs = render(helm, "--set", "redis.existingSecret=r", "--set",
                  f"runtimeNamespace.name={NAMESPACE}")
    env = env_of(only(docs, "Deployment", "runtime")["spec"]["template"]["spec"]["containers"][0])
    assert secret_ref(env["TENANTRY_RUNTIME_REDIS_URL"]) == ("r", "redis-url")


# --------------------------------------------------------------------------------- NOTES


@pytest.mark.parametrize(("values_file", "model"), [
    (CHART / "ci" / "evaluation-values.yaml", "claude-haiku-4-5"),
    (CHART / "ci" / "minimal-values.yaml", None)], ids=["evaluation", "operator-only"])
def test_notes_walk_through_a_first_tenant(helm: list[str], control_plane: ControlPlane,
                                           values_file: Path, model: str | None) -> None:
    namespace = f"notes-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", namespace)
    try:
        result = run_helm(helm, "install", "tenantry", str(CHART), "--dry-run=server",
                          # The session's operator tests applied the example plans
                          # with kubectl: a real install would adopt them the same way.
                          "--take-ownership",
                          f"--kubeconfig={control_plane.kubeconfig}", "--namespace", namespace,
                          "-f", str(values_file), "--set",
                          f"runtimeNamespace.name={namespace}-rt")
        assert result.returncode == 0, result.stderr
        notes = result.stdout.split("NOTES:", 1)[1]
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
    if model is None:
        assert "kind: Tenant" not in notes and "Anthropic(" not in notes
        assert "No plans installed" in notes
        return
    # The Tenant, its key, and an SDK call with the plan's model, through the runtime Service.
    tenant = yaml.safe_load(textwrap.dedent(
        notes.split("cat <<'YAML' | kubectl apply -f -\n", 1)[1].split("  YAML\n", 1)[0]))
    assert tenant["kind"] == "Tenant" and tenant["spec"]["planRef"] == {"name": "free"}
    assert tenant["spec"]["apiKeys"] == [{"name": "web"}]
    assert "kubectl -n tenant-acme get secret tenantry-api-keys -o jsonpath='{.data.web}'" in notes
    assert "port-forward service/tenantry-runtime 8000:80" in notes
    assert f'model="{model}"' in notes
    assert 'Anthropic(base_url="http://127.0.0.1:8000", api_key=os.environ["TENANT_KEY"])' in notes
    assert "EVALUATION MODE - NOT FOR PRODUCTION" in notes
    assert "WARNING: no model API key" not in notes  # the ci file gives one
    assert "/metrics is open" in notes
