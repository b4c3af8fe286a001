"""Monitoring: the operator's metrics, and the chart's ServiceMonitors, PrometheusRule and
Grafana dashboard checked against the code (every metric queried is one it exports) and
against promtool (the rules load, an alert fires as its unit test says)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import types
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import apply_tenant, wait_for, wait_ready
from tenantry_devenv.controlplane import ControlPlane
from tenantry_operator.metrics import METRICS, OperatorMetrics
from tenantry_operator.reconcile import Outcome
from tenantry_runtime.limits import Usage
from tenantry_runtime.metrics import Metrics
from test_chart import BUILD_SCRIPT, CHART, render

MONITORING = ["--set", "monitoring.serviceMonitor.enabled=true",
              "--set", "monitoring.prometheusRule.enabled=true",
              "--set", "monitoring.dashboard.enabled=true"]
# Grafana's variables, replaced by what they stand for before PromQL parses the query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$tenant": ".*"}


@pytest.fixture(scope="module")
def tools() -> Path:
    """The control-plane cache directory holding helm, promtool and promql-names."""
    built = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                           check=False)
    assert built.returncode == 0, f"{BUILD_SCRIPT} failed:\n{built.stderr[-4000:]}"
    found = Path(built.stdout.strip().splitlines()[-1])
    for tool in ("helm", "promtool", "promql-names"):
        assert (found / tool).is_file(), f"build.sh left no {tool} in {found}"
    return found


@pytest.fixture(scope="module")
def rendered(tools: Path) -> list[dict[str, Any]]:
    return render([str(tools / "helm")], *MONITORING)


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


# --------------------------------------------------------------------------------- exported


def exposition_names(text: str) -> set[str]:
    """Sample names a scrape of this exposition yields: histograms as _bucket/_sum/_count."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= ({f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                      if kind == "histogram" else {name})
    return names


def runtime_exposition() -> str:
    metrics = Metrics(max_tenants=10)
    metrics.settled("acme", "claude-haiku-4-5", 200, Usage(10, 20, 0, 0), 0.4,
                    Decimal("0.0001"), "USD")
    metrics.settled("acme", "claude-haiku-4-5", 502, Usage(10, 0, 0, 0), 1.0, None, "USD")
    metrics.rejected("acme", "daily_budget", 429)
    metrics.fallback.add(tenant="acme", outcome="open")
    return metrics.render(revisions={"acme": 3}, failures={"spool": 1}, refused={"bad": 1},
                          stale_ignored=1, in_flight=2, waiting=0).decode()


def operator_exposition() -> str:
    metrics = OperatorMetrics()
    metrics.record("acme", {}, Outcome(status={"phase": "Ready", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Reconciled"}]}), 0.2)
    metrics.record("globex", {}, Outcome(status={"phase": "Provisioning", "migration": {
        "step": "Copying", "startedAt": "2026-11-27T10:00:00Z"}, "conditions": [
        {"type": "Ready", "status": "False", "reason": "WaitingForSiloPod"}]}), 1.5)
    return metrics.render(leader=True).decode()


def exported_names() -> set[str]:
    return exposition_names(runtime_exposition()) | exposition_names(operator_exposition())


# --------------------------------------------------------------------------------- queried


def rule_groups(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = one(docs, "PrometheusRule")["spec"]["groups"]
    return groups


def dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    data = one(docs, "ConfigMap", "-dashboard")["data"]
    board: dict[str, Any] = json.loads(data["tenantry.json"])
    return board


def grafana_queries(board: dict[str, Any]) -> list[str]:
    """Every panel target's expression and every variable's label_values() selector."""
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", ())]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            queries.append(match.group(1))
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    assert not [q for q in queries if "$" in q], "a Grafana variable the test does not know"
    return queries


def metric_names(tools: Path, queries: list[str]) -> list[list[str]]:
    """The metric names each query reads, by Prometheus's own parser."""
    result = subprocess.run([str(tools / "promql-names")], input=json.dumps(queries),
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    names: list[list[str]] = json.loads(result.stdout)
    return names


def test_every_metric_the_rules_and_the_dashboard_query_is_exported(
        tools: Path, rendered: list[dict[str, Any]]) -> None:
    exported = exported_names()
    rules = [r for g in rule_groups(rendered) for r in g["rules"]]
    queries = [r["expr"] for r in rules] + grafana_queries(dashboard(rendered))
    per_query = metric_names(tools, queries)
    unknown = {name: query for query, names in zip(queries, per_query, strict=True)
               for name in names if name not in exported}
    assert unknown == {}
    assert all(per_query), "a query that reads no metric"
    # And the other way around: the dashboard or an alert uses every family the code exports
    # (a new metric is either shown somewhere or deliberately listed here).
    unused = exported - {n for names in per_query for n in names}
    assert unused == {
        "gen_ai_client_token_usage_bucket", "gen_ai_client_token_usage_count",
        "gen_ai_server_request_duration_seconds_sum",
        "gen_ai_server_request_duration_seconds_count",
        "tenantry_operator_reconcile_duration_seconds_sum",
        "tenantry_operator_reconcile_duration_seconds_count",
        "tenantry_runtime_config_revision", "tenantry_runtime_config_refused_total",
        "tenantry_runtime_config_stale_ignored_total",
    }


def test_the_name_parser_sees_through_functions_and_joins(tools: Path) -> None:
    assert metric_names(tools, [
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y"}[5m]))) / on() group_left b',
        '(sum(c) or vector(0)) < 1 and time() - max(d) > 3'],
    ) == [["a_bucket", "b"], ["c", "d"]]
    result = subprocess.run([str(tools / "promql-names")], input=json.dumps(['{job="x"}']),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "no metric name" in result.stderr


def test_rules_load_in_promtool(tools: Path, rendered: list[dict[str, Any]],
                                tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(rendered)}))
    result = subprocess.run([str(tools / "promtool"), "check", "rules", "--lint=all",
                             "--lint-fatal", str(rules)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout, result.stdout


def test_alerts_fire_as_promtool_unit_tests_say(tools: Path, rendered: list[dict[str, Any]],
                                                tmp_path: Path) -> None:
    """Series shaped like the code's exposition make the alerts fire, with their labels."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups(rendered)}))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m",
             "input_series": [
                 {"series": 'tenantry_runtime_rejections_total{tenant="acme",'
                            'reason="daily_budget",pod="rt-0"}',
                  "values": "0 0 3 5 8 8 8 8 8 8 8 8 8 8 8 8 8 8 8 8"},
                 # Upgrade started at t=0 (unix 0): one hour later it is stuck.
                 {"series": 'tenantry_operator_upgrade_started_timestamp_seconds{'
                            'tenant="globex",pod="op-0"}',
                  "values": "0x80"},
                 {"series": 'tenantry_operator_leader{pod="op-0"}', "values": "1x80"},
                 {"series": 'tenantry_runtime_redactions_total{kind="document_id",pod="rt-0"}',
                  "values": "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"},
             ],
             "alert_rule_test": [
                 {"eval_time": "5m", "alertname": "TenantryBudgetExhausted",
                  "exp_alerts": [{"exp_labels": {"severity": "info", "tenant": "acme",
                                                 "reason": "daily_budget"},
                                  "exp_annotations": {
                                      "summary": "Tenant acme exhausted its token budget "
                                                 "(daily_budget).",
                                      "description": one_rule(rendered, "TenantryBudgetExhausted")[
                                          "annotations"]["description"]}}]},
                 {"eval_time": "50m", "alertname": "TenantryUpgradeStuck", "exp_alerts": []},
                 {"eval_time": "70m", "alertname": "TenantryUpgradeStuck",
                  "exp_alerts": [{"exp_labels": {"severity": "warning", "tenant": "globex"},
                                  "exp_annotations": {
                                      "summary": "The isolation upgrade of tenant globex has "
                                                 "run for 1h 10m 0s.",
                                      "description": "kubectl get tnt globex -o jsonpath="
                                                     "'{.status.migration}' shows its step and "
                                                     "rows copied."}}]},
                 {"eval_time": "70m", "alertname": "TenantryOperatorNoLeader", "exp_alerts": []},
                 {"eval_time": "2m", "alertname": "TenantryCrossTenantIdentifierRedacted",
                  "exp_alerts": []},
                 {"eval_time": "5m", "alertname": "TenantryCrossTenantIdentifierRedacted",
                  "exp_alerts": [{"exp_labels": {"severity": "warning", "kind": "document_id"},
                                  "exp_annotations": {
                                      "summary": "An answer named another tenant (document_id); "
                                                 "the runtime redacted it.",
                                      "description": one_rule(
                                          rendered, "TenantryCrossTenantIdentifierRedacted")[
                                          "annotations"]["description"]}}]},
                 {"eval_time": "30m", "alertname": "TenantryCrossTenantIdentifierRedacted",
                  "exp_alerts": []},
             ]},
            {"interval": "1m",
             "input_series": [{"series": 'tenantry_operator_leader{pod="op-0"}',
                               "values": "0x10"}],
             "alert_rule_test": [
                 {"eval_time": "10m", "alertname": "TenantryOperatorNoLeader",
                  "exp_alerts": [{"exp_labels": {"severity": "critical"},
                                  "exp_annotations": {"summary": one_rule(
                                      rendered, "TenantryOperatorNoLeader")["annotations"][
                                      "summary"]}}]}]},
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([str(tools / "promtool"), "test", "rules", "tests.yaml"],
                            capture_output=True, text=True, check=False, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def one_rule(docs: list[dict[str, Any]], alert: str) -> dict[str, Any]:
    return next(r for g in rule_groups(docs) for r in g["rules"] if r.get("alert") == alert)


@pytest.mark.parametrize("exposition", [operator_exposition, runtime_exposition],
                         ids=["operator", "runtime"])
def test_expositions_pass_promtool_check_metrics(tools: Path, exposition: Any) -> None:
    result = subprocess.run([str(tools / "promtool"), "check", "metrics"],
                            input=exposition(), capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_come_from_values(tools: Path) -> None:
    docs = render([str(tools / "helm")], *MONITORING,
                  "--set", "monitoring.prometheusRule.stuckUpgradeMinutes=90",
                  "--set-json", "monitoring.prometheusRule.rejectionRatio=0.5",
                  "--set", "monitoring.prometheusRule.reconcileFailingMinutes=45")
    assert "> 5400" in one_rule(docs, "TenantryUpgradeStuck")["expr"]
    assert ") > 0.5" in one_rule(docs, "TenantryRejectionsSpike")["expr"]
    failing = one_rule(docs, "TenantryReconcileFailing")
    assert failing["for"] == "45m" and "45 minutes" in failing["annotations"]["summary"]


# --------------------------------------------------------------------------------- chart wiring


def test_monitoring_is_off_by_default(tools: Path) -> None:
    docs = render([str(tools / "helm")])
    assert not {d["kind"] for d in docs} & {"ServiceMonitor", "PrometheusRule"}
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-dashboard",
                                                                   "-operator-metrics"))]


def component(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and d["metadata"]["labels"].get("app.kubernetes.io/component") == name]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def test_service_monitors_select_the_metrics_endpoints(rendered: list[dict[str, Any]]) -> None:
    for name, service in (("operator", one(rendered, "Service", "-operator-metrics")),
                          ("runtime", component(rendered, "Service", "runtime"))):
        deployment = component(rendered, "Deployment", name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        # The Service reaches the Pods' named port that serves /metrics.
        assert service["spec"]["selector"].items() <= pod_labels.items(), name
        port = service["spec"]["ports"][0]
        assert port["targetPort"] in {p["name"] for p in container["ports"]}, name
        monitor = component(rendered, "ServiceMonitor", name)
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
            "labels"].items(), name
        assert monitor["spec"]["namespaceSelector"] == {
            "matchNames": [service["metadata"]["namespace"]]}
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        assert "authorization" not in monitor["spec"]["endpoints"][0]
        # No other Service of the chart is selected by it (the operator's metrics only once).
        others = [d for d in rendered if d["kind"] == "Service" and d is not service
                  and monitor["spec"]["selector"]["matchLabels"].items()
                  <= d["metadata"]["labels"].items()]
        assert others == [], name


def test_runtime_scrape_uses_the_metrics_token(tools: Path) -> None:
    docs = render([str(tools / "helm")], *MONITORING,
                  "--set", "runtime.metricsToken.existingSecret=rt-metrics",
                  "--set", "monitoring.serviceMonitor.labels.release=kps")
    monitor = component(docs, "ServiceMonitor", "runtime")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer", "credentials": {"name": "rt-metrics", "key": "metrics-token"}}
    # The runtime reads the same Secret and key as its token.
    env = {e["name"]: e for e in component(docs, "Deployment", "runtime")["spec"]["template"][
        "spec"]["containers"][0]["env"]}
    assert env["TENANTRY_RUNTIME_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "rt-metrics", "key": "metrics-token"}
    no_runtime = render([str(tools / "helm")], *MONITORING, "--set", "runtime.enabled=false")
    assert [d["metadata"]["name"] for d in no_runtime if d["kind"] == "ServiceMonitor"] == [
        "tenantry-operator"]


def test_dashboard_configmap_for_the_grafana_sidecar(tools: Path) -> None:
    docs = render([str(tools / "helm")], *MONITORING,
                  "--set", "monitoring.dashboard.namespace=grafana",
                  "--set", "monitoring.dashboard.annotations.grafana_folder=Tenantry")
    config_map = one(docs, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Tenantry"}
    board = json.loads(config_map["data"]["tenantry.json"])
    assert board == json.loads((CHART / "dashboards" / "tenantry.json").read_text())
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Tokens per second by tenant", "Cost per hour by tenant",
                   "p95 latency by tenant", "Daily budget used (last 24 hours)",
                   "Rejections per tenant by reason", "Tenants by phase",
                   "Reconciles by result"):
        assert wanted in titles
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


@pytest.mark.parametrize("args", [
    ["--set", "monitoring.prometheusRule.rejectionRatio=2"],
    ["--set", "monitoring.serviceMonitor.interval=30 seconds"],
    ["--set", "monitoring.dashbord.enabled=true"],
], ids=["ratio-above-one", "bad-duration", "typo"])
def test_schema_rejects_bad_monitoring_values(tools: Path, args: list[str]) -> None:
    result = subprocess.run([str(tools / "helm"), "template", "t", str(CHART), *args],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr


def test_lint_is_clean_with_monitoring(tools: Path) -> None:
    result = subprocess.run([str(tools / "helm"), "lint", "--strict", str(CHART), *MONITORING],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and "[WARNING]" not in result.stdout, result.stdout


def test_operator_metrics_service_passes_server_dry_run(
        rendered: list[dict[str, Any]], control_plane: ControlPlane) -> None:
    """The one core object monitoring adds; the monitoring.coreos.com kinds need the
    Prometheus Operator's CRDs, which this control plane does not have."""
    service = one(rendered, "Service", "-operator-metrics")
    service["metadata"]["namespace"] = "default"
    result = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                                   input_text=json.dumps(service))
    assert "serverside-applied (server dry run)" in result.stdout


# --------------------------------------------------------------------------------- operator


def ready_status(reason: str = "Reconciled", ok: bool = True, phase: str = "Ready",
                 **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ok else "False", "reason": reason}], **extra}


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_reconciles_are_counted_by_result_and_reason() -> None:
    metrics = OperatorMetrics()
    metrics.record("a", {}, Outcome(status=ready_status()), 0.3)
    metrics.record("b", {}, Outcome(status=ready_status("WaitingForSiloPod", False,
                                                        "Provisioning")), 0.3)
    metrics.record("c", {}, Outcome(status=ready_status("IsolationLowered", False, "Failed")),
                   0.3)
    metrics.record("d", {}, Outcome(status=ready_status(phase="Suspended")), 0.3)
    with pytest.raises(ConnectionError), metrics.reconciling("e", {}):
        raise ConnectionError("API server gone")
    got = samples(metrics.render(leader=False).decode())
    assert got['tenantry_operator_reconciles_total{result="ready"}'] == 2
    assert got['tenantry_operator_reconciles_total{result="progressing"}'] == 1
    assert got['tenantry_operator_reconciles_total{result="failed"}'] == 1
    assert got['tenantry_operator_reconciles_total{result="error"}'] == 1
    assert got['tenantry_operator_reconcile_failures_total{reason="WaitingForSiloPod"}'] == 1
    assert got['tenantry_operator_reconcile_failures_total{reason="IsolationLowered"}'] == 1
    assert got['tenantry_operator_reconcile_failures_total{reason="ConnectionError"}'] == 1
    assert got['tenantry_operator_reconcile_duration_seconds_count{result="ready"}'] == 2
    assert got['tenantry_operator_reconcile_duration_seconds_bucket{result="error",le="+Inf"}'] == 1
    assert got['tenantry_operator_tenants{phase="Ready"}'] == 1
    assert got['tenantry_operator_tenants{phase="Failed"}'] == 1
    assert got["tenantry_operator_leader"] == 0
    assert got["tenantry_operator_upgrades_in_progress"] == 0


def test_upgrades_in_progress_and_their_start() -> None:
    metrics = OperatorMetrics()
    running = {"from": "pool", "to": "bridge", "step": "Copying",
               "startedAt": "2026-11-27T10:00:00Z"}
    metrics.record("a", {}, Outcome(status=ready_status(migration=running)), 1)
    # The status patch is a merge: an outcome without `migration` keeps the body's.
    metrics.record("b", {"status": {"migration": running}}, Outcome(status=ready_status()), 1)
    metrics.record("c", {}, Outcome(status=ready_status(migration={**running, "step": "Done"})),
                   1)
    got = samples(metrics.render(leader=True).decode())
    assert got["tenantry_operator_upgrades_in_progress"] == 2
    assert got['tenantry_operator_upgrade_started_timestamp_seconds{tenant="a"}'] == 1795773600
    assert 'tenantry_operator_upgrade_started_timestamp_seconds{tenant="c"}' not in got
    metrics.deleting("a")
    metrics.forget("b")
    got = samples(metrics.render(leader=True).decode())
    assert got['tenantry_operator_tenants{phase="Deleting"}'] == 1
    assert 'tenantry_operator_upgrade_started_timestamp_seconds{tenant="b"}' not in got


@pytest.fixture
def health_server(operator: object) -> Iterator[int]:
    """serve_health on a free port, as `python -m tenantry_operator` runs it (leader)."""
    # Imported only now: __main__ imports the handlers, whose resync timer reads its interval
    # at import, which must come after the operator fixture set it.
    from tenantry_operator.__main__ import serve_health

    loop = asyncio.new_event_loop()
    elector = types.SimpleNamespace(is_leader=True)
    runner = loop.run_until_complete(serve_health(0, elector))  # type: ignore[arg-type]
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield int(port)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_operator_serves_what_it_reconciled(control_plane: ControlPlane,
                                            health_server: int) -> None:
    """The in-process operator records real reconciles; GET /metrics serves them."""
    apply_tenant(control_plane, "metricsok", plan="pro", isolation="pool",
                 ai={"budgets": {"dailyTokens": 123456}})
    apply_tenant(control_plane, "metricsnoplan", plan="nosuchplan", isolation="pool")
    try:
        wait_ready(control_plane, "metricsok", timeout=120)
        wait_for("metricsnoplan recorded", lambda: "metricsnoplan" in METRICS.tenants)
        with urllib.request.urlopen(f"http://127.0.0.1:{health_server}/metrics",
                                    timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            got = samples(response.read().decode())
        assert got["tenantry_operator_leader"] == 1
        assert got['tenantry_operator_tenant_budget_tokens{tenant="metricsok",period="daily"}'] \
            == 123456
        assert got['tenantry_operator_tenant_budget_tokens{tenant="metricsok",period="monthly"}'] \
            == 40000000  # the pro plan's
        assert got['tenantry_operator_reconcile_failures_total{reason="PlanNotFound"}'] >= 1
        assert got['tenantry_operator_reconciles_total{result="ready"}'] >= 1
        assert METRICS.tenants["metricsok"].phase == "Ready"
        assert METRICS.tenants["metricsnoplan"].phase == "Provisioning"
        assert METRICS.tenants["metricsnoplan"].budgets == {}
    finally:
        control_plane.kubectl("delete", "tnt", "metricsok", "metricsnoplan", "--wait=false")
    wait_for("deleted tenants forgotten", lambda: not {"metricsok", "metricsnoplan"}
             & set(METRICS.tenants), timeout=120)
