"""The chart's usage export: a CronJob running `python -m tenantry_runtime.export --once`.

Rendered with helm (a ci/ values file and variants), refused by values.schema.json where the
values are wrong, dry-run on the local API server, and run for real: the CronJob container's
own command, args and env, taken from the rendered manifest, export usage rows from the embedded
Postgres to the OpenMeter and Stripe stand-ins of tests/billing_standins.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml
from billing_standins import OpenMeterStandIn, StripeStandIn
from db_helpers import scratch_database
from runtime_helpers import serve
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres
from tenantry_runtime.contracts.database import migrate
from tenantry_runtime.export import ExportSettings
from test_billing_export import insert_usage
from test_chart import (  # noqa: F401 - helm_fixture: the `helm` fixture
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    Manifest,
    effective_values,
    env_of,
    helm_fixture,
    render,
    run_helm,
    secret_ref,
)
from test_chart_identity import container_env

CUSTOM = CHART / "ci" / "custom-values.yaml"  # OpenMeter, its token from a Secret
TENANTS = ("acme", "globex", "initech")
STRIPE_KEY = "rk_test_chart_export"
OPENMETER_TOKEN = "om-chart-export"
STRIPE_SET = ["usageExport.enabled=true", "usageExport.provider=stripe",
              "usageExport.existingSecret=stripe-meter-events",
              "usageExport.existingSecretKey=restricted-key",
              *(f"usageExport.stripe.customers.{t}=cus_{t}" for t in TENANTS)]
STRIPE = ["-f", str(CHART / "ci" / "default-values.yaml"),
          *(arg for s in STRIPE_SET for arg in ("--set", s))]
EVALUATION = ["-f", str(CHART / "ci" / "evaluation-values.yaml"), "--set",
              "usageExport.enabled=true", "--set",
              "usageExport.url=http://openmeter.openmeter.svc:8888"]
VARIANTS = {"custom-openmeter": ["-f", str(CUSTOM)], "stripe": STRIPE, "evaluation": EVALUATION}
KEY_VARIABLE = {"openmeter": "TENANTRY_EXPORT_OPENMETER_TOKEN",
                "stripe": "TENANTRY_EXPORT_STRIPE_API_KEY"}


def of_export(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (d["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") == "usage-export"]


def cronjob(docs: list[Manifest]) -> Manifest:
    [found] = of_export(docs, "CronJob")
    return found


def pod_spec(docs: list[Manifest]) -> Manifest:
    spec: Manifest = cronjob(docs)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def export_container(docs: list[Manifest]) -> Manifest:
    containers: list[Manifest] = pod_spec(docs)["containers"]
    assert len(containers) == 1
    return containers[0]


def first_container(docs: list[Manifest], component: str) -> Manifest:
    [deployment] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"].get(
        "app.kubernetes.io/component") == component]
    container: Manifest = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def values_of(args: list[str]) -> Manifest:
    """values.yaml, the -f file and the --set pairs (scalars and one level of map) merged."""
    values = effective_values(Path(args[1]))
    for pair in (args[i + 1] for i, a in enumerate(args) if a == "--set"):
        path, value = pair.split("=", 1)
        *parents, leaf = path.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return values


# --------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_off_unless_asked_for(helm: list[str], values_file: Path) -> None:
    docs = render(helm, "-f", str(values_file))
    enabled = effective_values(values_file)["usageExport"]["enabled"]
    assert enabled is (values_file == CUSTOM)  # custom-values.yaml turns every knob
    assert sorted(d["kind"] for d in docs if (d["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") == "usage-export") == (
        ["CronJob", "NetworkPolicy", "ServiceAccount"] if enabled else [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cronjob_runs_the_exporter_as_configured(helm: list[str], variant: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    args = VARIANTS[variant]
    docs = render(helm, *args)
    values = values_of(args)
    ue = values["usageExport"]
    job = cronjob(docs)
    spec = job["spec"]
    # Never two at once; a run cut short resumes from the checkpoint on the next.
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["schedule"] == ue["schedule"]
    assert spec["startingDeadlineSeconds"] == ue["startingDeadlineSeconds"]
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (
        ue["successfulJobsHistoryLimit"], ue["failedJobsHistoryLimit"])
    job_spec = spec["jobTemplate"]["spec"]
    assert job_spec["activeDeadlineSeconds"] == ue["activeDeadlineSeconds"]
    assert job_spec["backoffLimit"] == ue["backoffLimit"]
    # Exit 2 (refused, misconfigured) fails the Job at once; exit 1 is retried.
    fail_job = job_spec["podFailurePolicy"]["rules"][0]
    assert fail_job["action"] == "FailJob" and fail_job["onExitCodes"] == {
        "containerName": "export", "operator": "In", "values": [2]}
    assert len(job["metadata"]["name"]) <= 52  # Kubernetes' limit for CronJob names
    # The exporter module of the runtime image, once per run.
    container = export_container(docs)
    assert container["name"] == "export"
    assert container["command"] == ["python", "-m", "tenantry_runtime.export"]
    assert container["args"] == ["--once"]
    assert container["image"] == first_container(docs, "runtime")["image"]
    assert container["resources"] == ue["resources"]
    # Restricted: non-root, read-only root filesystem, no privileges, no token, no RBAC.
    pod = pod_spec(docs)
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == ue["podSecurityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    [account] = of_export(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == job["metadata"]["namespace"] == NAMESPACE
    for binding in (d for d in docs if d["kind"] in {"RoleBinding", "ClusterRoleBinding"}):
        assert account["metadata"]["name"] not in {s["name"] for s in binding["subjects"]}
    # The operator's admin DSN, from the very Secret and key the operator reads it from.
    env = env_of(container)
    operator_env = env_of(first_container(docs, "operator"))
    assert secret_ref(env["TENANTRY_EXPORT_DATABASE_URL"]) == secret_ref(
        operator_env["TENANTRY_DATABASE_URL"])
    # The provider's key from the user's Secret only (OpenMeter's token may be absent).
    key = KEY_VARIABLE[ue["provider"]]
    if ue["existingSecret"]:
        assert secret_ref(env[key]) == (ue["existingSecret"], ue["existingSecretKey"])
    else:
        assert key not in env
    # Every literal TENANTRY_EXPORT_* is an export setting, and they parse as the exporter
    # reads them: from its environment.
    literal = {n: e["value"] for n, e in env.items() if "value" in e}
    assert {n.removeprefix("TENANTRY_EXPORT_").lower() for n in literal
            if n.startswith("TENANTRY_EXPORT_")} <= set(ExportSettings.model_fields)
    for name in [n for n in os.environ if n.startswith("TENANTRY_EXPORT_")]:
        monkeypatch.delenv(name)
    for name, value in literal.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TENANTRY_EXPORT_DATABASE_URL", "postgresql://from-the-secret")
    settings = ExportSettings()  # from the environment
    assert settings.provider == ue["provider"] and settings.batch_size == ue["batchSize"]
    if ue["provider"] == "openmeter":
        assert settings.openmeter_url == ue["url"]
    else:
        assert settings.stripe_customers == ue["stripe"]["customers"]
        assert settings.stripe_event_name == ue["stripe"]["eventName"]
    for name, value in ue["env"].items():
        assert env[name]["value"] == value


# --------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "usageExport.apiKey=sk_live_x"], "apiKey"),
    (["--set", "usageExport.token=om_x"], "token"),
    (["--set", "usageExport.env.TENANTRY_EXPORT_OPENMETER_TOKEN=om_x"],
     "TENANTRY_EXPORT_OPENMETER_TOKEN"),
    (["--set", "usageExport.env.TENANTRY_EXPORT_STRIPE_API_KEY=sk_live_x"],
     "TENANTRY_EXPORT_STRIPE_API_KEY"),
    (["--set", "usageExport.env.TENANTRY_EXPORT_DATABASE_URL=postgresql://a@b/c"],
     "TENANTRY_EXPORT_DATABASE_URL"),
    (["--set", "usageExport.provider=paddle"], "provider"),
    (["--set", "usageExport.enabled=true", "--set", "usageExport.provider=stripe"],
     "existingSecret"),
    (["--set", "usageExport.enabled=true"], "url"),
    (["--set", "usageExport.url=ftp://openmeter"], "url"),
    (["--set", "usageExport.schedule=hourly"], "schedule"),
    (["--set", "usageExport.stripe.customers.acme=acct_123"], "acct_123"),
    (["--set", "usageExport.batchSize=0"], "batchSize"),
    (["--set", "usageExport.env.PATH=/x"], "PATH"),
    (["--set", "usageExport.schedul=@hourly"], "schedul"),
    (["--set", "evaluation.networkPolicy.enabld=false"], "enabld"),
], ids=["plaintext-key", "plaintext-token", "token-in-env", "stripe-key-in-env", "dsn-in-env",
        "provider", "stripe-without-key", "openmeter-without-url", "url-scheme", "schedule",
        "customer-id", "batch-size", "env-not-export", "typo", "netpol-typo"])
def test_schema_rejects_bad_values(helm: list[str], args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "-f",
                      str(CHART / "ci" / "default-values.yaml"), *args)
    assert result.returncode != 0, f"{args} rendered:\n{result.stdout[:2000]}"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "usageExport.enabled=true", "--set", "usageExport.url=http://om:8888"],
     "usageExport reads every tenant's usage with the operator's admin DSN"),
    (["-f", str(CUSTOM), "--set", "usageExport.env.TENANTRY_EXPORT_OPENMETER_URL=http://x"],
     "usageExport.env.TENANTRY_EXPORT_OPENMETER_URL: set by the chart"),
], ids=["no-database", "env-overrides-chart"])
def test_template_rejects_contradictions(helm: list[str], args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --------------------------------------------------------------------------------- API server


@pytest.mark.parametrize("variant", ["stripe", "evaluation"])
def test_server_dry_run_accepts_the_export(helm: list[str], control_plane: ControlPlane,
                                          variant: str) -> None:
    """The CronJob (podFailurePolicy and all), its ServiceAccount and NetworkPolicy, and in
    evaluation mode the data stores' NetworkPolicies, on the API server under Pod Security
    `restricted`. (The custom-values.yaml variant is dry-run whole by tests/test_chart.py.)"""
    namespace = f"export-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.kubectl("label", "namespace", namespace,
                          "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/warn=restricted")
    try:
        docs = [d for d in render(helm, *VARIANTS[variant], release=namespace,
                                  namespace=namespace)
                if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
                == "usage-export" or (d["kind"] == "NetworkPolicy" and d["metadata"][
                    "namespace"] == namespace)]
        kinds = sorted(d["kind"] for d in docs)
        # Its own NetworkPolicy, and in evaluation mode the data stores' two.
        assert kinds == (["CronJob", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                          "ServiceAccount"]
                         if variant == "evaluation" else ["CronJob", "NetworkPolicy",
                                                          "ServiceAccount"])
        result = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                                       input_text=yaml.safe_dump_all(docs, sort_keys=False))
        assert "PodSecurity" not in result.stderr, result.stderr
        assert result.stdout.count("serverside-applied (server dry run)") == len(docs)
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")


def test_notes_say_how_to_run_it_now(helm: list[str], control_plane: ControlPlane) -> None:
    namespace = f"export-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", namespace)
    try:
        result = run_helm(helm, "install", "tenantry", str(CHART), "--dry-run=server",
                          "--take-ownership",  # the example plans other tests applied
                          f"--kubeconfig={control_plane.kubeconfig}", "--namespace", namespace,
                          "-f", str(CUSTOM), "--set", f"runtimeNamespace.name={namespace}-rt")
        assert result.returncode == 0, result.stderr
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
    notes = result.stdout.split("NOTES:", 1)[1]
    name = cronjob(render(helm, "-f", str(CUSTOM)))["metadata"]["name"]
    assert f"Usage export to openmeter: CronJob {name}" in notes
    assert f"kubectl -n {namespace} create job --from=cronjob/{name} {name}-now" in notes


# --------------------------------------------------------------------------------- for real


@pytest.fixture
def usage_dsn(postgres: Postgres) -> Iterator[str]:
    """A scratch database migrated like the shared one; its superuser DSN (as the admin's)."""
    with scratch_database(postgres, "chartexport") as name:
        dsn = postgres.dsn(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, "tenantry")
        yield dsn


def run_rendered(container: Manifest, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The container's command and args as rendered; `python` is the image's interpreter, here
    this test's (the checkout's packages on PYTHONPATH, as the image installs them)."""
    argv = [*container["command"], *container["args"]]
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_rendered_openmeter_export_sends_the_usage_for_real(helm: list[str],
                                                            usage_dsn: str) -> None:
    docs = render(helm, "-f", str(CUSTOM))
    ue = effective_values(CUSTOM)["usageExport"]
    container = export_container(docs)
    # The rendered URL is the cluster's (openmeter.openmeter.svc), which does not resolve
    # here: it is replaced by the stand-in's local address; the Secrets' values (admin DSN,
    # token) are what a Pod would get from them, pointing at this machine's services.
    literal = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert literal["TENANTRY_EXPORT_OPENMETER_URL"] == ue["url"]
    ids = insert_usage(usage_dsn, 0, 3, created_at=datetime.now(UTC) - timedelta(hours=1),
                       tenants=TENANTS)
    stand_in = OpenMeterStandIn(token=OPENMETER_TOKEN)
    with serve(stand_in.app()) as url:
        env = container_env(container, TENANTRY_EXPORT_DATABASE_URL=usage_dsn,
                            TENANTRY_EXPORT_OPENMETER_TOKEN=OPENMETER_TOKEN,
                            TENANTRY_EXPORT_OPENMETER_URL=url)
        done = run_rendered(container, env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert stand_in.rejected == [] and sorted(stand_in.accepted_ids()) == ids
        # The values' settings reached the exporter: its CloudEvents source from usageExport.env.
        assert {e["source"] for e in stand_in.accepted} == {ue["env"]["TENANTRY_EXPORT_SOURCE"]}
        assert {e["subject"] for e in stand_in.accepted} == set(TENANTS)
        # The next scheduled run resumes from the checkpoint: nothing is sent twice.
        again = run_rendered(container, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert stand_in.batches == 1 and stand_in.duplicates == 0
    assert OPENMETER_TOKEN not in done.stdout + done.stderr


def test_rendered_stripe_export_sends_the_usage_for_real(helm: list[str],
                                                         usage_dsn: str) -> None:
    docs = render(helm, *STRIPE)
    container = export_container(docs)
    literal = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # No URL in the values: the exporter's default, Stripe's API. Here the stand-in's local
    # address is added in its place (the one variable given that the chart does not render).
    assert "TENANTRY_EXPORT_STRIPE_URL" not in literal
    ids = insert_usage(usage_dsn, 0, 3, created_at=datetime.now(UTC) - timedelta(hours=1),
                       tenants=TENANTS)
    stand_in = StripeStandIn(api_key=STRIPE_KEY)
    with serve(stand_in.app()) as url:
        env = container_env(container, TENANTRY_EXPORT_DATABASE_URL=usage_dsn,
                            TENANTRY_EXPORT_STRIPE_API_KEY=STRIPE_KEY,
                            TENANTRY_EXPORT_STRIPE_URL=url)
        done = run_rendered(container, env)
        assert done.returncode == 0, done.stdout + done.stderr
    assert stand_in.rejected == [] and sorted(stand_in.accepted_ids()) == ids
    # Each tenant's events on its customer from usageExport.stripe.customers.
    customers = json.loads(literal["TENANTRY_EXPORT_STRIPE_CUSTOMERS"])
    assert customers == {t: f"cus_{t}" for t in TENANTS}
    assert {e["payload[stripe_customer_id]"] for e in stand_in.accepted} == {
        f"cus_{t}" for t in TENANTS}
    assert {e["event_name"] for e in stand_in.accepted} == {literal[
        "TENANTRY_EXPORT_STRIPE_EVENT_NAME"]}
