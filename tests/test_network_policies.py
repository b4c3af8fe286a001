"""The NetworkPolicies rendered for tenant namespaces, evaluated by a real policy analyzer.

cyclonus (built from Go modules by tools/controlplane/build.sh) reads the policies the operator's
builders render and answers, for every pair of Pods in a small cluster model (two tenants, a silo
database, the runtime, the operator, an ingress controller's namespace, kube-dns, a bystander)
and a few outside addresses, whether the traffic is allowed. The analyzer is run, never mocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import netpol_helpers
import pytest
import yaml
from netpol_helpers import Peer, cyclonus_fixture  # noqa: F401 - the `cyclonus` fixture
from tenantry_operator import builders, guardrails
from tenantry_operator.model import PlanSpec, TenantSpec, effective_spec

RUNTIME_NS = "tenantry-runtime"
OPERATOR_NS = "tenantry-operator"
INGRESS_NS = "ingress-nginx"  # allowed into tenant alpha only
ALPHA_CIDR = "203.0.113.0/24"  # alpha's one egress destination
CLUSTER_CIDRS = ("10.244.0.0/16", "10.96.0.0/12")  # TENANTRY_CLUSTER_CIDRS: Pods, Services
PLAN = PlanSpec.model_validate({"model": "claude-haiku-4-5",
                                "allowedIsolation": ["pool", "bridge", "silo"]})
ALPHA = effective_spec("alpha", "uid-a", 1, TenantSpec.from_body({
    "planRef": {"name": "p"}, "network": {"allowIngressFromNamespaces": [INGRESS_NS],
                                          "allowEgressCIDRs": [ALPHA_CIDR]}}), PLAN)
# bravo: a silo that may reach anywhere outside, and names alpha's namespace as allowed in.
BRAVO = effective_spec("bravo", "uid-b", 1, TenantSpec.from_body({
    "planRef": {"name": "p"}, "isolation": "silo", "database": {"storage": {"size": "1Gi"}},
    "network": {"allowIngressFromNamespaces": ["tenant-alpha"],
                "allowEgressCIDRs": ["0.0.0.0/0"]}}), PLAN)


def namespace_labels(name: str) -> dict[str, str]:
    """A namespace's labels as the API server stores them: the builder's for a tenant's, plus
    kubernetes.io/metadata.name, which the server sets on every namespace."""
    labels: dict[str, str] = {}
    for spec in (ALPHA, BRAVO):
        manifest = builders.tenant_namespace(spec, "tenant-")
        if manifest["metadata"]["name"] == name:
            labels.update(manifest["metadata"]["labels"])
    return {**labels, "kubernetes.io/metadata.name": name}


def app_pod_labels() -> dict[str, str]:
    """A tenant's own Deployment: labels of its choosing (the same in both tenants)."""
    deployment: dict[str, Any] = yaml.safe_load("""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec:
              serviceAccountName: tenant-workloads
              containers: [{name: web, image: web, ports: [{containerPort: 8080}]}]
    """)
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def silo_pod_labels() -> dict[str, str]:
    """The labels of bravo's database Pod, from the StatefulSet the operator applies."""
    sts = builders.silo_statefulset(BRAVO, "tenant-bravo", "postgres")
    labels: dict[str, str] = sts["spec"]["template"]["metadata"]["labels"]
    return labels


PODS = [
    Peer("alpha-web", "tenant-alpha", app_pod_labels(), "10.244.1.10", 8080),
    Peer("alpha-worker", "tenant-alpha", {"app": "worker"}, "10.244.1.11", 8080),
    Peer("bravo-web", "tenant-bravo", app_pod_labels(), "10.244.2.10", 8080),
    Peer("bravo-db", "tenant-bravo", silo_pod_labels(), "10.244.2.11", builders.SILO_PORT),
    Peer("runtime", RUNTIME_NS, {"app.kubernetes.io/name": "tenantry-runtime"}, "10.244.3.10",
         8000),
    Peer("operator", OPERATOR_NS, {"app.kubernetes.io/name": "tenantry"}, "10.244.4.10", 8080),
    Peer("ingress", INGRESS_NS, {"app": "ingress-nginx"}, "10.244.5.10", 443),
    Peer("dns", "kube-system", {"k8s-app": "kube-dns"}, "10.244.6.10", 53, "UDP"),
    Peer("bystander", "default", {"app": "other"}, "10.244.7.10", 8080),
]
OUTSIDE_IN_ALPHA_CIDR = "203.0.113.9"
OUTSIDE_ELSEWHERE = "198.51.100.7"


def rendered_policies(directory: Path) -> Path:
    """Every guardrail the step would apply to both tenants, as files the analyzer reads."""
    policies = [m for spec in (ALPHA, BRAVO) for m in guardrails.guardrail_manifests(
        spec, f"tenant-{spec.name}", RUNTIME_NS, OPERATOR_NS, CLUSTER_CIDRS)
        if m["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies if p["metadata"]["namespace"]
            == "tenant-bravo"} >= {guardrails.POLICY_SILO_DATABASE}
    return netpol_helpers.write_policies(directory, policies)


def analyze(cyclonus: str, directory: Path,
            queries: list[tuple[Peer, Peer | str, int, str]]) -> list[bool]:
    """The analyzer's verdict on each (source, destination, port, protocol), in order."""
    return netpol_helpers.analyze(cyclonus, rendered_policies(directory), directory, queries,
                                  namespace_labels)


@pytest.fixture(scope="module")
def matrix(cyclonus: str, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """"source->destination" for every allowed pair of Pods, each probed on the destination's
    own port, plus each Pod towards the two outside addresses (on 443)."""
    queries: list[tuple[Peer, Peer | str, int, str]] = []
    for source in PODS:
        queries += [(source, dest, dest.port, dest.protocol) for dest in PODS if dest != source]
        queries += [(source, ip, 443, "TCP") for ip in (OUTSIDE_IN_ALPHA_CIDR, OUTSIDE_ELSEWHERE)]
    verdicts = analyze(cyclonus, tmp_path_factory.mktemp("netpol"), queries)
    return {f"{s.name}->{d if isinstance(d, str) else d.name}"
           for (s, d, _, _), ok in zip(queries, verdicts, strict=True) if ok}


def allowed_from(matrix: set[str], source: str) -> set[str]:
    return {pair.split("->")[1] for pair in matrix if pair.startswith(f"{source}->")}


def allowed_into(matrix: set[str], destination: str) -> set[str]:
    return {pair.split("->")[0] for pair in matrix if pair.endswith(f"->{destination}")}


TENANT_PODS = {"alpha-web", "alpha-worker", "bravo-web", "bravo-db"}
NOT_TENANTS = {"runtime", "operator", "ingress", "dns", "bystander"}  # no policies of ours


def test_no_path_between_two_tenant_namespaces(matrix: set[str]) -> None:
    crossing = {pair for pair in matrix
                if {p.split("-")[0] for p in pair.split("->")} == {"alpha", "bravo"}}
    # bravo allows tenant-alpha in and may reach 0.0.0.0/0 (which holds alpha's Pod IPs):
    # neither opens a path, because the other end's policy does not allow it.
    assert crossing == set()


def test_tenant_pods_reach_their_own_namespace_the_runtime_dns_and_their_cidrs(
        matrix: set[str]) -> None:
    assert allowed_from(matrix, "alpha-web") == {"alpha-worker", "runtime", "dns",
                                                 OUTSIDE_IN_ALPHA_CIDR}
    assert allowed_from(matrix, "alpha-worker") == {"alpha-web", "runtime", "dns",
                                                    OUTSIDE_IN_ALPHA_CIDR}
    # bravo's apps: not even their own database (only the runtime and the operator reach it),
    # and its 0.0.0.0/0 stops at the cluster's own ranges (no bystander, operator, ingress).
    assert allowed_from(matrix, "bravo-web") == {"runtime", "dns", OUTSIDE_IN_ALPHA_CIDR,
                                                 OUTSIDE_ELSEWHERE}
    assert allowed_from(matrix, "bravo-db") == {"dns"}


def test_runtime_reaches_both_tenants_and_the_allowed_namespace_only_alpha(
        matrix: set[str]) -> None:
    assert allowed_from(matrix, "runtime") >= TENANT_PODS
    assert allowed_from(matrix, "ingress") & TENANT_PODS == {"alpha-web", "alpha-worker"}
    assert allowed_from(matrix, "bystander") & TENANT_PODS == set()
    assert allowed_from(matrix, "dns") & TENANT_PODS == set()
    assert allowed_into(matrix, "alpha-web") == {"alpha-worker", "runtime", "ingress"}
    assert allowed_into(matrix, "bravo-web") == {"runtime"}


def test_silo_database_admits_only_the_runtime_and_the_operator_on_its_port(
        cyclonus: str, matrix: set[str], tmp_path: Path) -> None:
    assert allowed_into(matrix, "bravo-db") == {"runtime", "operator"}
    pods = {p.name: p for p in PODS}
    db, runtime = pods["bravo-db"], pods["runtime"]
    assert analyze(cyclonus, tmp_path, [(runtime, db, 22, "TCP"), (runtime, db, 5432, "UDP"),
                                        (runtime, db, 5432, "TCP")]) == [False, False, True]


def test_dns_is_allowed_on_udp_and_tcp_53_only(cyclonus: str, tmp_path: Path) -> None:
    pods = {p.name: p for p in PODS}
    queries: list[tuple[Peer, Peer | str, int, str]] = [
        (pods[name], pods["dns"], port, proto)
        for name in ("alpha-web", "bravo-db")
        for port, proto in ((53, "UDP"), (53, "TCP"), (8053, "UDP"))]
    # A Pod in kube-system that is not kube-dns gets nothing on 53.
    impostor = Peer("impostor", "kube-system", {"app": "impostor"}, "10.244.6.11", 53, "UDP")
    queries.append((pods["alpha-web"], impostor, 53, "UDP"))
    assert analyze(cyclonus, tmp_path, queries) == [True, True, False] * 2 + [False]


def test_the_non_tenant_pods_are_untouched(matrix: set[str]) -> None:
    """The policies select only tenant namespaces: the rest of the cluster is as before."""
    for source in NOT_TENANTS:
        assert allowed_from(matrix, source) >= NOT_TENANTS - {source}


def test_egress_cidrs_lose_the_cluster_ranges() -> None:
    blocks = guardrails.egress_blocks(["0.0.0.0/0", "10.244.3.0/24", "192.0.2.0/24", "::/0"],
                                      CLUSTER_CIDRS)
    assert blocks == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16", "10.96.0.0/12"]}},
        # 10.244.3.0/24 is all Pods: dropped, not opened.
        {"ipBlock": {"cidr": "192.0.2.0/24"}},
        {"ipBlock": {"cidr": "::/0"}},
    ]
