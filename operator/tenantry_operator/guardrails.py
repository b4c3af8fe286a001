"""Guardrails of a tenant namespace: ResourceQuota, LimitRange, NetworkPolicies, ServiceAccount.

Pure builders (effective spec in, manifests out) and the one step that applies them. The
network layout (docs/architecture.md, Guardrails):

- everything is denied in both directions unless a policy below allows it;
- every Pod may ask kube-dns (kube-system) on port 53, UDP and TCP;
- the tenant's workloads (every Pod the operator did not create) admit the runtime's namespace, the
  namespaces of spec.network.allowIngressFromNamespaces and each other, and reach the runtime's
  namespace (the API they call with their keys), each other and spec.network.allowEgressCIDRs;
- a silo database admits only the runtime's and the operator's namespaces, on its port.

A path needs both ends to allow it, so no tenant namespace reaches another: no tenant allows
egress to another tenant's namespace, whatever the other lists in allowIngressFromNamespaces.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal
from typing import Any

from lightkube.utils.quantity import parse_quantity

from . import builders
from .conditions import Condition
from .model import EffectiveSpec, Isolation
from .names import LABEL_TENANT, standard_labels
from .steps import StepContext

Manifest = dict[str, Any]

QUOTA_NAME = "tenantry-quota"
LIMIT_RANGE_NAME = "tenantry-limits"
SERVICE_ACCOUNT_NAME = "tenant-workloads"
POLICY_DEFAULT_DENY = "tenantry-default-deny"
POLICY_DNS = "tenantry-allow-dns"
POLICY_WORKLOADS = "tenantry-workloads"
POLICY_SILO_DATABASE = "tenantry-silo-database"

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
COMPONENT_LABEL = "app.kubernetes.io/component"
SILO_COMPONENT = "silo-database"  # builders._silo_labels: the component of the silo's Pods
DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}  # CoreDNS keeps kube-dns's label for compatibility
# Cut out of every tenant's allowEgressCIDRs like the cluster's ranges: link-local addresses
# are the node's own services, the cloud's instance metadata (169.254.169.254, AWS's IPv6
# fd00:ec2::254) among them, which hands out the node's credentials to whoever asks.
NODE_LOCAL_CIDRS = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")

# What a silo adds to the tenant's own quota: its Pod, its volume claim, and two Services
# (headless and client, builders.silo_services).
SILO_PODS, SILO_CLAIMS, SILO_SERVICES = 1, 1, 2

_BINARY_SUFFIXES = (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024))


def quantity(text: str | int) -> Decimal:
    value = parse_quantity(str(text))
    if value is None:
        raise ValueError(f"not a quantity: {text!r}")
    return value


def cpu_text(value: Decimal) -> str:
    """Whole cores as "2", anything else in millicores (rounded up) as "1500m"."""
    if value == value.to_integral_value():
        return str(int(value))
    return f"{int((value * 1000).to_integral_value(ROUND_CEILING))}m"


def bytes_text(value: Decimal) -> str:
    """Bytes with the largest binary suffix that divides them ("5Gi", "1536Mi")."""
    whole = int(value.to_integral_value(ROUND_CEILING))
    for suffix, size in _BINARY_SUFFIXES:
        if whole and whole % size == 0:
            return f"{whole // size}{suffix}"
    return str(whole)


def _text(resource: str, value: Decimal) -> str:
    return cpu_text(value) if resource == "cpu" else bytes_text(value)


def silo_container(spec: EffectiveSpec) -> dict[str, dict[str, Decimal]]:
    """The requests and limits the silo's database container ends up with: its own
    spec.database.resources, a limit standing in for a missing request (API defaulting), and
    the LimitRange's defaults (LimitRanger admission) for the rest."""
    own = spec.database.resources
    requests, limits = own.get("requests") or {}, own.get("limits") or {}
    defaults = spec.container_limits
    result: dict[str, dict[str, Decimal]] = {"requests": {}, "limits": {}}
    for resource in ("cpu", "memory"):
        request = requests.get(resource) or limits.get(resource)
        limit = limits.get(resource)
        result["requests"][resource] = quantity(
            request if request is not None else getattr(defaults.default_request, resource))
        result["limits"][resource] = quantity(
            limit if limit is not None else getattr(defaults.default, resource))
    return result


def _is_silo(spec: EffectiveSpec) -> bool:
    return spec.isolation is Isolation.SILO and spec.database.storage is not None


def resource_quota(spec: EffectiveSpec, namespace: str) -> Manifest:
    """The plan's quota for the tenant's workloads, plus room for a silo's database."""
    plan = spec.namespace_quota
    totals = {
        "requests.cpu": quantity(plan.requests.cpu),
        "requests.memory": quantity(plan.requests.memory),
        "limits.cpu": quantity(plan.limits.cpu),
        "limits.memory": quantity(plan.limits.memory),
        "requests.storage": quantity(plan.requests.storage),
    }
    counts = {"pods": plan.pods, "services": plan.services,
              "persistentvolumeclaims": plan.persistent_volume_claims}
    storage = spec.database.storage
    if spec.isolation is Isolation.SILO and storage is not None:
        database = silo_container(spec)
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                totals[f"{kind}.{resource}"] += database[kind][resource]
        totals["requests.storage"] += quantity(storage.size)
        counts["pods"] += SILO_PODS
        counts["services"] += SILO_SERVICES
        counts["persistentvolumeclaims"] += SILO_CLAIMS
    hard = {key: _text(key.rsplit(".", 1)[-1], value) for key, value in totals.items()}
    hard.update({key: str(value) for key, value in counts.items()})
    # Tenant Services stay inside the cluster; the way in is an allowed namespace (an ingress
    # controller's), which the network policies admit.
    hard.update({"services.loadbalancers": "0", "services.nodeports": "0"})
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": QUOTA_NAME, "namespace": namespace,
                     "labels": standard_labels(spec.name, "guardrails")},
        "spec": {"hard": dict(sorted(hard.items()))},
    }


def limit_range(spec: EffectiveSpec, namespace: str) -> Manifest:
    """Container defaults (a quota on requests and limits refuses Pods without them) and a
    maximum; the maximum also admits the silo's database container."""
    limits = spec.container_limits
    maximum = {r: quantity(getattr(limits.max, r)) for r in ("cpu", "memory")}
    if _is_silo(spec):
        database = silo_container(spec)["limits"]
        maximum = {r: max(v, database[r]) for r, v in maximum.items()}

    def pair(values: Any) -> dict[str, str]:
        return {r: _text(r, quantity(getattr(values, r))) for r in ("cpu", "memory")}

    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": {"name": LIMIT_RANGE_NAME, "namespace": namespace,
                     "labels": standard_labels(spec.name, "guardrails")},
        "spec": {"limits": [{
            "type": "Container",
            "defaultRequest": pair(limits.default_request),
            "default": pair(limits.default),
            "max": {r: _text(r, v) for r, v in maximum.items()},
        }]},
    }


def service_account(spec: EffectiveSpec, namespace: str) -> Manifest:
    """The identity for the tenant's workloads: no token mounted, and no RoleBinding names it."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": SERVICE_ACCOUNT_NAME, "namespace": namespace,
                     "labels": standard_labels(spec.name, "guardrails")},
        "automountServiceAccountToken": False,
    }


def _namespaces(*names: str) -> dict[str, Any]:
    """A peer matching namespaces by name (the label the API server sets and nobody can fake)."""
    return {"namespaceSelector": {"matchExpressions": [
        {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(set(names))}]}}


# The tenant's workloads: every Pod the operator did not create (its Pods carry the tenant
# label). DoesNotExist rather than `component NotIn [silo-database]`: the same set today, and
# read alike by every implementation (cyclonus, for one, takes NotIn to need the key).
WORKLOADS = {"matchExpressions": [{"key": LABEL_TENANT, "operator": "DoesNotExist"}]}


def egress_blocks(allowed: Sequence[str], cluster: Sequence[str]) -> list[dict[str, Any]]:
    """ipBlock peers for the tenant's CIDRs with the cluster's own ranges cut out: CNIs that
    match ipBlocks against Pod IPs would otherwise let 0.0.0.0/0 reach every Pod whose
    namespace has no policy of its own. A CIDR wholly inside the cluster's ranges is dropped."""
    excluded = [ipaddress.ip_network(c) for c in cluster]
    blocks: list[dict[str, Any]] = []
    for text in sorted(allowed):
        net = ipaddress.ip_network(text)
        if any(net.version == e.version and net.subnet_of(e) for e in excluded):  # type: ignore[arg-type]
            continue
        cut = sorted(str(e) for e in excluded
                     if e.version == net.version and e.subnet_of(net))  # type: ignore[arg-type]
        blocks.append({"ipBlock": {"cidr": text, **({"except": cut} if cut else {})}})
    return blocks


def _policy(spec: EffectiveSpec, namespace: str, name: str, body: dict[str, Any]) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": standard_labels(spec.name, "network-policy")},
        "spec": body,
    }


def network_policies(spec: EffectiveSpec, namespace: str, runtime_namespace: str,
                     operator_namespace: str, cluster_cidrs: Sequence[str] = ()) -> list[Manifest]:
    """Default deny, DNS, the workloads' paths, and (silo) the database's two clients."""
    network = spec.network
    dns_ports = [{"protocol": proto, "port": 53} for proto in ("UDP", "TCP")]
    workload_ingress: list[dict[str, Any]] = [{"podSelector": WORKLOADS},
                                              _namespaces(runtime_namespace)]
    if network.allow_ingress_from_namespaces:
        workload_ingress.append(_namespaces(*network.allow_ingress_from_namespaces))
    workload_egress: list[dict[str, Any]] = [{"podSelector": WORKLOADS},
                                             _namespaces(runtime_namespace)]
    workload_egress += egress_blocks(network.allow_egress_cidrs,
                                     [*NODE_LOCAL_CIDRS, *cluster_cidrs])
    policies = [
        _policy(spec, namespace, POLICY_DEFAULT_DENY,
                {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        _policy(spec, namespace, POLICY_DNS, {
            "podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{**_namespaces(DNS_NAMESPACE),
                                "podSelector": {"matchLabels": DNS_POD_LABELS}}],
                        "ports": dns_ports}]}),
        _policy(spec, namespace, POLICY_WORKLOADS, {
            "podSelector": WORKLOADS, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": workload_ingress}],
            "egress": [{"to": workload_egress}]}),
    ]
    if _is_silo(spec):
        policies.append(_policy(spec, namespace, POLICY_SILO_DATABASE, {
            "podSelector": {"matchLabels": {**builders.silo_selector(spec.name),
                                            COMPONENT_LABEL: SILO_COMPONENT}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [_namespaces(runtime_namespace, operator_namespace)],
                         "ports": [{"protocol": "TCP", "port": builders.SILO_PORT}]}]}))
    return policies


def guardrail_manifests(spec: EffectiveSpec, namespace: str, runtime_namespace: str,
                        operator_namespace: str, cluster_cidrs: Sequence[str] = ()
                        ) -> list[Manifest]:
    """Everything the step applies, quota and limits first (they must precede any Pod)."""
    return [resource_quota(spec, namespace), limit_range(spec, namespace),
            *network_policies(spec, namespace, runtime_namespace, operator_namespace,
                              cluster_cidrs),
            service_account(spec, namespace)]


async def ensure_guardrails(ctx: StepContext) -> Condition:
    """Runs before the database step: a silo's Pod starts with its quota room and its network
    policy in place, and a larger volume fits the quota before the claim grows."""
    # The operator's own namespace is where it keeps credential copies (settings).
    manifests = guardrail_manifests(ctx.spec, ctx.namespace, ctx.settings.runtime_namespace,
                                    ctx.settings.credentials_namespace,
                                    ctx.settings.cluster_cidrs)
    for manifest in manifests:
        await ctx.apply(manifest)
    policies = sum(m["kind"] == "NetworkPolicy" for m in manifests)
    return Condition("GuardrailsReady", True, "Applied",
                     f"ResourceQuota {QUOTA_NAME}, LimitRange {LIMIT_RANGE_NAME}, {policies}"
                     f" NetworkPolicies, ServiceAccount {SERVICE_ACCOUNT_NAME}")
