"""The evaluation mode's Postgres and Redis behind NetworkPolicies, judged by a real analyzer.

The chart is rendered with helm (evaluation mode, the usage export on); its NetworkPolicies (the
data stores', the runtime's and the usage export's own) go to cyclonus with a model of the Pods
around them: the operator, the runtime, the usage export's Pods, a tenant's app, a bystander,
kube-dns, and Pods that look like ours but are not. Each Pod's labels are taken from the
rendered object that creates it, so the test follows the chart's labels rather than a copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from netpol_helpers import Peer, Query, analyze, cyclonus_fixture, write_policies  # noqa: F401
from test_chart import (  # noqa: F401 - helm_fixture: the `helm` fixture
    CHART,
    NAMESPACE,
    Manifest,
    helm_fixture,
    render,
)

RUNTIME_NS = "tenantry-runtime"
TENANT_NS = "tenant-acme"
EVALUATION = ["-f", str(CHART / "ci" / "evaluation-values.yaml"),
              "--set", f"runtimeNamespace.name={RUNTIME_NS}"]
WITH_EXPORT = [*EVALUATION, "--set", "usageExport.enabled=true",
               "--set", "usageExport.url=http://openmeter.openmeter.svc:8888"]
PG, REDIS = 5432, 6379
OUTSIDE = "198.51.100.7"
OPENMETER_PORT = 8888  # the port of WITH_EXPORT's url


def component(docs: list[Manifest], kind: str, name: str) -> Manifest:
    [found] = [d for d in docs if d["kind"] == kind and (d["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") == name]
    return found


def pod_labels(workload: Manifest) -> dict[str, str]:
    spec = workload["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if workload["kind"] == "CronJob" \
        else spec["template"]
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def operator_deployment(docs: list[Manifest]) -> Manifest:
    [found] = [d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    return found


class Cluster:
    """The Pods of the model, from one render of the chart."""

    def __init__(self, docs: list[Manifest]) -> None:
        runtime = pod_labels(component(docs, "Deployment", "runtime"))
        self.operator = Peer("operator", NAMESPACE, pod_labels(operator_deployment(docs)),
                             "10.244.1.10", 8080)
        self.runtime = Peer("runtime", RUNTIME_NS, runtime, "10.244.2.10", 8000)
        self.postgres = Peer("postgres", NAMESPACE,
                             pod_labels(component(docs, "StatefulSet", "postgres")),
                             "10.244.1.20", PG)
        self.redis = Peer("redis", NAMESPACE, pod_labels(component(docs, "StatefulSet", "redis")),
                          "10.244.1.21", REDIS)
        self.tenant_app = Peer("tenant-app", TENANT_NS, {"app": "web"}, "10.244.3.10", 8080)
        self.bystander = Peer("bystander", "default", {"app": "other"}, "10.244.4.10", 8080)
        self.dns = Peer("dns", "kube-system", {"k8s-app": "kube-dns"}, "10.244.5.10", 53, "UDP")
        # Look-alikes: another Pod of the runtime's namespace; a Pod carrying the runtime's
        # labels in a namespace that is not the runtime's (a tenant may label Pods as it likes).
        self.runtime_neighbour = Peer("runtime-neighbour", RUNTIME_NS, {"app": "debug"},
                                      "10.244.2.11", 8080)
        self.runtime_impostor = Peer("runtime-impostor", TENANT_NS, runtime, "10.244.3.11", 8000)
        export = [d for d in docs if d["kind"] == "CronJob"]
        self.export = Peer("export", NAMESPACE, pod_labels(export[0]), "10.244.1.30", 8080) \
            if export else None


@pytest.fixture(scope="module")
def rendered(helm: list[str]) -> list[Manifest]:
    return render(helm, *WITH_EXPORT)


def verdicts(cyclonus: str, docs: list[Manifest], directory: Path,
             queries: list[Query]) -> list[bool]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    # The data stores' two, the runtime's own (its egress decides its side of the path) and,
    # with the usage export, the export's.
    export = ["usage-export"] if any(d["kind"] == "CronJob" for d in docs) else []
    stores = ["postgres", "redis"] if any(d["kind"] == "StatefulSet" for d in docs) else []
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in policies) == (
        sorted([*stores, "runtime", *export]))
    return analyze(cyclonus, write_policies(directory, policies), directory, queries)


def test_postgres_admits_the_operator_the_runtime_and_the_export_only(
        cyclonus: str, rendered: list[Manifest], tmp_path: Path) -> None:
    c = Cluster(rendered)
    assert c.export is not None
    allowed: list[Query] = [(c.operator, c.postgres, PG, "TCP"), (c.runtime, c.postgres, PG, "TCP"),
                            (c.export, c.postgres, PG, "TCP")]
    denied: list[Query] = [
        (c.tenant_app, c.postgres, PG, "TCP"), (c.bystander, c.postgres, PG, "TCP"),
        (c.runtime_neighbour, c.postgres, PG, "TCP"), (c.runtime_impostor, c.postgres, PG, "TCP"),
        (c.redis, c.postgres, PG, "TCP"),
        # Its port only, over TCP only.
        (c.operator, c.postgres, 22, "TCP"), (c.runtime, c.postgres, PG, "UDP")]
    assert verdicts(cyclonus, rendered, tmp_path, allowed + denied) == (
        [True] * len(allowed) + [False] * len(denied))


def test_redis_admits_the_operator_and_the_runtime_only(
        cyclonus: str, rendered: list[Manifest], tmp_path: Path) -> None:
    c = Cluster(rendered)
    assert c.export is not None
    allowed: list[Query] = [(c.operator, c.redis, REDIS, "TCP"),
                            (c.runtime, c.redis, REDIS, "TCP")]
    denied: list[Query] = [
        (c.export, c.redis, REDIS, "TCP"),  # the exporter reads Postgres only
        (c.tenant_app, c.redis, REDIS, "TCP"), (c.bystander, c.redis, REDIS, "TCP"),
        (c.runtime_neighbour, c.redis, REDIS, "TCP"), (c.runtime_impostor, c.redis, REDIS, "TCP"),
        (c.postgres, c.redis, REDIS, "TCP"), (c.operator, c.redis, PG, "TCP")]
    assert verdicts(cyclonus, rendered, tmp_path, allowed + denied) == (
        [True] * len(allowed) + [False] * len(denied))


def test_the_data_stores_reach_nothing_not_even_dns(
        cyclonus: str, rendered: list[Manifest], tmp_path: Path) -> None:
    c = Cluster(rendered)
    assert c.export is not None
    queries: list[Query] = [
        (store, dest, port, proto)
        for store in (c.postgres, c.redis)
        for dest, port, proto in ((c.operator, 8080, "TCP"), (c.runtime, 8000, "TCP"),
                                  (c.export, 8080, "TCP"), (c.tenant_app, 8080, "TCP"),
                                  (c.bystander, 8080, "TCP"), (c.dns, 53, "UDP"),
                                  (c.dns, 53, "TCP"), (OUTSIDE, 443, "TCP"))]
    queries += [(c.postgres, c.redis, REDIS, "TCP"), (c.redis, c.postgres, PG, "TCP")]
    # Controls: the model does not deny everything. The Pods the new policies do not select
    # reach out as before: the operator (no policy) anywhere, the runtime DNS (its own policy).
    controls: list[Query] = [(c.operator, OUTSIDE, 443, "TCP"), (c.runtime, c.dns, 53, "UDP"),
                             (c.bystander, c.operator, 8080, "TCP")]
    assert verdicts(cyclonus, rendered, tmp_path, queries + controls) == (
        [False] * len(queries) + [True] * len(controls))


def test_without_the_export_its_pods_are_not_admitted(
        cyclonus: str, helm: list[str], rendered: list[Manifest], tmp_path: Path) -> None:
    """The export's peer is there because usageExport.enabled is; off, a Pod with its labels
    (from the render with it on) is refused like any other."""
    export = Cluster(rendered).export
    assert export is not None
    docs = render(helm, *EVALUATION)
    assert not [d for d in docs if d["kind"] == "CronJob"]
    c = Cluster(docs)
    assert verdicts(cyclonus, docs, tmp_path, [(export, c.postgres, PG, "TCP"),
                                               (c.runtime, c.postgres, PG, "TCP")]) == [
        False, True]


def test_the_policies_follow_their_values(helm: list[str]) -> None:
    """On by default with evaluation mode; off by evaluation.networkPolicy.enabled=false; none
    without evaluation mode (then the data stores are yours, and so are their policies)."""
    def stores(*args: str) -> list[str]:
        return sorted(d["metadata"]["name"] for d in render(helm, *args)
                      if d["kind"] == "NetworkPolicy"
                      and "tenantry.dev/evaluation-only" in d["metadata"]["labels"])

    assert stores(*EVALUATION) == ["tenantry-postgres", "tenantry-redis"]
    assert stores(*EVALUATION, "--set", "evaluation.networkPolicy.enabled=false") == []
    assert stores("-f", str(CHART / "ci" / "default-values.yaml")) == []
    # Without the runtime, the operator alone is admitted.
    docs = render(helm, *EVALUATION, "--set", "runtime.enabled=false")
    operator = {"podSelector": operator_deployment(docs)["spec"]["selector"]}
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        [rule] = policy["spec"]["ingress"]
        assert rule["from"] == [operator]


# --------------------------------------------------------------------- the usage export's Pods


def test_the_export_reaches_dns_its_postgres_and_the_provider_only(
        cyclonus: str, rendered: list[Manifest], tmp_path: Path) -> None:
    """Evaluation mode: out to kube-dns, the bundled Postgres and the OpenMeter URL's port (the
    provider may live anywhere); nothing else out, and nothing in."""
    c = Cluster(rendered)
    assert c.export is not None
    openmeter = Peer("openmeter", "openmeter", {"app": "openmeter"}, "10.244.6.10",
                     OPENMETER_PORT)
    allowed: list[Query] = [
        (c.export, c.postgres, PG, "TCP"), (c.export, c.dns, 53, "UDP"),
        (c.export, c.dns, 53, "TCP"), (c.export, openmeter, OPENMETER_PORT, "TCP"),
        (c.export, OUTSIDE, OPENMETER_PORT, "TCP")]
    denied: list[Query] = [
        (c.export, c.redis, REDIS, "TCP"), (c.export, c.operator, 8080, "TCP"),
        (c.export, c.runtime, 8000, "TCP"), (c.export, c.tenant_app, 8080, "TCP"),
        # Its Postgres on another port; another Postgres; DNS from anyone but kube-dns.
        (c.export, c.postgres, 22, "TCP"),
        (c.export, Peer("tenant-db", TENANT_NS, {"app": "postgres"}, "10.244.3.20", PG),
         PG, "TCP"),
        (c.export, c.bystander, 53, "UDP"), (c.export, OUTSIDE, 53, "UDP"),
        # The provider's port over UDP; any other port outside.
        (c.export, OUTSIDE, OPENMETER_PORT, "UDP"), (c.export, OUTSIDE, 443, "TCP"),
        (c.export, OUTSIDE, 22, "TCP"),
        # Nothing in, not even from the operator or the runtime.
        (c.operator, c.export, 8080, "TCP"), (c.runtime, c.export, 8080, "TCP"),
        (c.bystander, c.export, 8080, "TCP"), (c.postgres, c.export, 8080, "TCP")]
    assert verdicts(cyclonus, rendered, tmp_path, allowed + denied) == (
        [True] * len(allowed) + [False] * len(denied))


def test_the_export_policy_follows_its_configured_cidrs_and_ports(
        cyclonus: str, helm: list[str], tmp_path: Path) -> None:
    """External Postgres and Stripe: the database and provider CIDRs and ports from values; the
    provider's port from its https URL when none is given; off by its flag."""
    external = ["--set", "database.url=postgres://tenantry@db.example:6432/tenantry",
                "--set", f"runtimeNamespace.name={RUNTIME_NS}",
                "--set", "usageExport.enabled=true", "--set", "usageExport.provider=stripe",
                "--set", "usageExport.existingSecret=stripe-meter-events",
                "--set", "usageExport.networkPolicy.database.to[0].ipBlock.cidr=192.0.2.0/24",
                "--set", "usageExport.networkPolicy.database.port=6432",
                "--set", "usageExport.networkPolicy.target.to[0].ipBlock.cidr=203.0.113.0/24"]
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    docs = render(helm, *external)
    [cronjob] = [d for d in docs if d["kind"] == "CronJob"]
    export = Peer("export", NAMESPACE, pod_labels(cronjob), "10.244.1.30", 8080)
    dns = Peer("dns", "kube-system", {"k8s-app": "kube-dns"}, "10.244.5.10", 53, "UDP")
    database, stripe = "192.0.2.5", "203.0.113.9"
    allowed: list[Query] = [(export, database, 6432, "TCP"), (export, stripe, 443, "TCP"),
                            (export, dns, 53, "UDP")]
    denied: list[Query] = [
        (export, database, PG, "TCP"), (export, OUTSIDE, 6432, "TCP"),
        (export, OUTSIDE, 443, "TCP"), (export, stripe, 6432, "TCP"),
        (export, database, 443, "TCP")]
    assert verdicts(cyclonus, docs, tmp_path / "a", allowed + denied) == (
        [True] * len(allowed) + [False] * len(denied))

    # The provider's port given: it replaces the URL's.
    docs = render(helm, *external, "--set", "usageExport.networkPolicy.target.port=8443")
    assert verdicts(cyclonus, docs, tmp_path / "b", [(export, stripe, 8443, "TCP"),
                                                      (export, stripe, 443, "TCP")]) == [
        True, False]

    docs = render(helm, *external, "--set", "usageExport.networkPolicy.enabled=false")
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"
                and d["metadata"]["labels"]["app.kubernetes.io/component"] == "usage-export"]
