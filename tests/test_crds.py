"""Tenant and TenantPlan CRDs against a real kube-apiserver: schema, defaults, CEL, explain."""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import deep_merge
from tenantry_devenv.controlplane import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_FILES = sorted((REPO_ROOT / "crds").glob("*.yaml"))
EXAMPLE_FILES = [REPO_ROOT / "examples" / n for n in ("plans.yaml", "tenants.yaml",
                                                     "tenant-silo.yaml")]
API_VERSION = "tenantry.dev/v1alpha1"
# Names the invalid manifests use; nothing else in the suite creates objects with them, so a
# server-side dry run is always a create (no transition rules involved).
PROBE_TENANT = "crdprobe"
PROBE_PLAN = "crdprobe"

Manifest = dict[str, Any]
Proc = subprocess.CompletedProcess[str]


# --------------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    """A Tenant-safe unique name (lowercase letters and digits)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def tenant(spec: Manifest, name: str = PROBE_TENANT) -> Manifest:
    return {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": name},
            "spec": spec}


def tenant_spec(**fields: Any) -> Manifest:
    """A valid minimal Tenant spec (plan free) with the given fields added or replaced."""
    return {"planRef": {"name": "free"}, **fields}


def silo_spec(**fields: Any) -> Manifest:
    """A valid silo spec; pass database= to replace the 10Gi default storage."""
    return tenant_spec(**{"isolation": "silo", "database": {"storage": {"size": "10Gi"}},
                          **fields})


def plan(spec: Manifest, name: str = PROBE_PLAN) -> Manifest:
    return {"apiVersion": API_VERSION, "kind": "TenantPlan", "metadata": {"name": name},
            "spec": spec}


def plan_spec(**fields: Any) -> Manifest:
    return {"model": "claude-haiku-4-5", **fields}


def to_yaml(manifest: Manifest | str) -> str:
    return manifest if isinstance(manifest, str) else yaml.safe_dump(manifest, sort_keys=False)


def dry_run(plane: ControlPlane, manifest: Manifest | str) -> Proc:
    return plane.kubectl("apply", "--dry-run=server", "-f", "-",
                         input_text=to_yaml(manifest), check=False)


def one_line(text: str) -> str:
    """kubectl wraps long descriptions; compare with all whitespace collapsed."""
    return " ".join(text.split())


class Objects:
    """Creates real objects through kubectl and deletes them all at teardown."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.names: list[tuple[str, str]] = []

    def _track(self, manifest: Manifest) -> None:
        key = (manifest["kind"].lower(), manifest["metadata"]["name"])
        if key not in self.names:
            self.names.append(key)

    def apply(self, manifest: Manifest) -> Proc:
        self._track(manifest)
        return self.plane.kubectl("apply", "-f", "-", input_text=to_yaml(manifest), check=False)

    def create_json(self, manifest: Manifest) -> Manifest:
        self._track(manifest)
        out = self.plane.kubectl("create", "-o", "json", "-f", "-", input_text=to_yaml(manifest))
        created: Manifest = json.loads(out.stdout)
        return created

    def get(self, kind: str, name: str) -> Manifest:
        obj: Manifest = json.loads(self.plane.kubectl("get", kind, name, "-o", "json").stdout)
        return obj

    def delete_all(self) -> None:
        for kind, name in reversed(self.names):
            self.plane.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false",
                               check=False)


@pytest.fixture
def objects(control_plane: ControlPlane) -> Iterator[Objects]:
    tracker = Objects(control_plane)
    try:
        yield tracker
    finally:
        tracker.delete_all()


# --------------------------------------------------------------------------------- 1. valid


def example_ids(path: Path) -> list[str]:
    return [f"{d['kind'].lower()}.tenantry.dev/{d['metadata']['name']}"
            for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.name for p in EXAMPLE_FILES])
def test_example_documents_are_accepted(control_plane: ControlPlane, path: Path) -> None:
    expected = example_ids(path)
    assert expected, f"{path.name} has no documents"
    result = control_plane.kubectl("apply", "--dry-run=server", "-o", "name", "-f", str(path),
                                   check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(expected)


def test_minimal_tenant_gets_server_side_defaults(objects: Objects) -> None:
    name = unique("dflt")
    created = objects.create_json(tenant({"planRef": {"name": "free"}}, name=name))
    assert created["metadata"]["name"] == name
    expected_spec = {
        "planRef": {"name": "free"},
        "isolation": "pool",
        "deletionPolicy": "Retain",
        "suspended": False,
        "rag": {"enabled": True, "embeddingDimensions": 384, "topK": 5,
                "hnsw": {"m": 16, "efConstruction": 64}},
        "network": {},
    }
    assert created["spec"] == expected_spec
    # Defaults are persisted, not only shown in the create response.
    assert objects.get("tenant", name)["spec"] == expected_spec


def test_dedicated_endpoint_gets_default_secret_key(objects: Objects) -> None:
    name = unique("dflt")
    endpoint = {"type": "dedicated", "url": "https://models.example/v1",
                "secretRef": {"name": "model-key"}}
    objects.create_json(tenant(tenant_spec(ai={"endpoint": endpoint}), name=name))
    stored = objects.get("tenant", name)["spec"]["ai"]["endpoint"]
    assert stored["secretRef"] == {"name": "model-key", "key": "api-key"}


def test_minimal_plan_gets_server_side_defaults(objects: Objects) -> None:
    name = f"crd-dflt-{uuid.uuid4().hex[:8]}"
    created = objects.create_json(plan({"model": "claude-haiku-4-5"}, name=name))
    expected_spec = {
        "model": "claude-haiku-4-5",
        "tier": 0,
        "maxTokensPerRequest": 4096,
        "budgets": {"dailyTokens": 100000, "monthlyTokens": 1000000, "overageAllowed": False,
                    "failOpen": False},
        "rateLimits": {"requestsPerMinute": 60, "tokensPerMinute": 100000},
        "allowedIsolation": ["pool"],
        "billing": {"includedMonthlyTokens": 0, "overagePricePerMillionTokens": "0",
                    "currency": "USD"},
        # Guardrails of each tenant namespace (tests/test_guardrails.py).
        "namespaceQuota": {"requests": {"cpu": "2", "memory": "4Gi", "storage": "20Gi"},
                           "limits": {"cpu": "4", "memory": "8Gi"}, "pods": 20,
                           "services": 10, "persistentVolumeClaims": 5},
        "containerLimits": {"defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                            "default": {"cpu": "500m", "memory": "512Mi"},
                            "max": {"cpu": "2", "memory": "4Gi"}},
    }
    assert created["spec"] == expected_spec
    assert objects.get("tenantplan", name)["spec"] == expected_spec


# --------------------------------------------------------------------------------- 2. invalid

NAME_RULE = "metadata.name must be a DNS label of at most 40 characters"
DEDICATED = "a dedicated endpoint requires both url and secretRef"
BAD_URL = "endpoint.url must be an absolute http(s) URL"
BAD_SIZE = "database.storage.size must be a positive quantity"
ONLY_CPU_MEM = "only cpu and memory may be set"
BAD_CIDR = "allowEgressCIDRs entries must be CIDR blocks"

INVALID: list[tuple[str, Manifest | str, str]] = [
    # --- Tenant names (CEL rule on the root, and the API server's own name validation)
    ("name-uppercase", tenant(tenant_spec(), name="Acme"), "a lowercase RFC 1123 subdomain"),
    ("name-dot", tenant(tenant_spec(), name="acme.corp"), NAME_RULE),
    ("name-trailing-hyphen", tenant(tenant_spec(), name="acme-"),
     "a lowercase RFC 1123 subdomain"),
    ("name-underscore", tenant(tenant_spec(), name="acme_corp"),
     "a lowercase RFC 1123 subdomain"),
    ("name-leading-digit", tenant(tenant_spec(), name="1acme"), NAME_RULE),
    ("name-41-chars", tenant(tenant_spec(), name="a" * 41), NAME_RULE),
    # --- required fields and enums
    ("missing-spec", {"apiVersion": API_VERSION, "kind": "Tenant",
                      "metadata": {"name": PROBE_TENANT}}, "spec: Required value"),
    ("missing-planRef", tenant({"isolation": "pool"}), "spec.planRef: Required value"),
    ("empty-plan-name", tenant({"planRef": {"name": ""}}),
     "spec.planRef.name in body should be at least 1 chars long"),
    ("bad-plan-name", tenant({"planRef": {"name": "Pro_Plan"}}),
     "spec.planRef.name in body should match"),
    ("isolation-enum", tenant(tenant_spec(isolation="shared")),
     'spec.isolation: Unsupported value: "shared"'),
    ("deletionPolicy-Destroy", tenant(tenant_spec(deletionPolicy="Destroy")),
     'spec.deletionPolicy: Unsupported value: "Destroy"'),
    ("suspended-not-bool", tenant(tenant_spec(suspended="yes")),
     "spec.suspended in body must be of type boolean"),
    ("unknown-field", tenant(tenant_spec(tier="gold")), 'unknown field "spec.tier"'),
    ("bad-region", tenant(tenant_spec(dataResidency={"region": "EU West"})),
     "spec.dataResidency.region in body should match"),
    # --- silo needs storage
    ("silo-without-database", tenant(tenant_spec(isolation="silo")),
     "isolation silo requires spec.database.storage"),
    ("silo-without-storage", tenant(tenant_spec(
        isolation="silo", database={"resources": {"requests": {"cpu": "1"}}})),
     "isolation silo requires spec.database.storage"),
    # --- model endpoint
    ("dedicated-without-url", tenant(tenant_spec(ai={"endpoint": {
        "type": "dedicated", "secretRef": {"name": "model-key"}}})), DEDICATED),
    ("dedicated-without-secretRef", tenant(tenant_spec(ai={"endpoint": {
        "type": "dedicated", "url": "https://models.example/v1"}})), DEDICATED),
    ("shared-with-url", tenant(tenant_spec(ai={"endpoint": {
        "type": "shared", "url": "https://models.example/v1"}})),
     "a shared endpoint takes no url or secretRef"),
    ("default-shared-with-secretRef", tenant(tenant_spec(ai={"endpoint": {
        "secretRef": {"name": "model-key"}}})), "a shared endpoint takes no url or secretRef"),
    ("endpoint-type-enum", tenant(tenant_spec(ai={"endpoint": {"type": "private"}})),
     'spec.ai.endpoint.type: Unsupported value: "private"'),
    ("endpoint-url-not-url", tenant(tenant_spec(ai={"endpoint": {
        "type": "dedicated", "url": "not a url", "secretRef": {"name": "k"}}})), BAD_URL),
    ("endpoint-url-ftp", tenant(tenant_spec(ai={"endpoint": {
        "type": "dedicated", "url": "ftp://models.example/v1", "secretRef": {"name": "k"}}})),
     BAD_URL),
    ("bad-secretRef-name", tenant(tenant_spec(ai={"endpoint": {
        "type": "dedicated", "url": "https://models.example/v1",
        "secretRef": {"name": "Model_Key"}}})),
     "spec.ai.endpoint.secretRef.name in body should match"),
    ("bad-model", tenant(tenant_spec(ai={"model": "-sonnet"})),
     "spec.ai.model in body should match"),
    # --- budgets and rate limits
    ("daily-over-monthly", tenant(tenant_spec(ai={"budgets": {
        "dailyTokens": 2000, "monthlyTokens": 1000}})),
     "ai.budgets.dailyTokens must not exceed ai.budgets.monthlyTokens"),
    ("maxTokens-over-tpm", tenant(tenant_spec(ai={
        "maxTokensPerRequest": 8192, "rateLimits": {"tokensPerMinute": 4096}})),
     "ai.maxTokensPerRequest must not exceed ai.rateLimits.tokensPerMinute"),
    ("negative-daily", tenant(tenant_spec(ai={"budgets": {"dailyTokens": -1}})),
     "spec.ai.budgets.dailyTokens in body should be greater than or equal to 0"),
    ("negative-monthly", tenant(tenant_spec(ai={"budgets": {"monthlyTokens": -5}})),
     "spec.ai.budgets.monthlyTokens in body should be greater than or equal to 0"),
    ("rpm-zero", tenant(tenant_spec(ai={"rateLimits": {"requestsPerMinute": 0}})),
     "spec.ai.rateLimits.requestsPerMinute in body should be greater than or equal to 1"),
    ("tpm-zero", tenant(tenant_spec(ai={"rateLimits": {"tokensPerMinute": 0}})),
     "spec.ai.rateLimits.tokensPerMinute in body should be greater than or equal to 1"),
    ("maxTokens-zero", tenant(tenant_spec(ai={"maxTokensPerRequest": 0})),
     "spec.ai.maxTokensPerRequest in body should be greater than or equal to 1"),
    # --- RAG
    ("embeddingDimensions-0", tenant(tenant_spec(rag={"embeddingDimensions": 0})),
     "spec.rag.embeddingDimensions in body should be greater than or equal to 1"),
    ("embeddingDimensions-2001", tenant(tenant_spec(rag={"embeddingDimensions": 2001})),
     "spec.rag.embeddingDimensions in body should be less than or equal to 2000"),
    ("topK-51", tenant(tenant_spec(rag={"topK": 51})),
     "spec.rag.topK in body should be less than or equal to 50"),
    ("hnsw-m-1", tenant(tenant_spec(rag={"hnsw": {"m": 1}})),
     "spec.rag.hnsw.m in body should be greater than or equal to 2"),
    ("hnsw-efConstruction-below-2m", tenant(tenant_spec(rag={"hnsw": {
        "m": 40, "efConstruction": 79}})),
     "rag.hnsw.efConstruction must be at least twice rag.hnsw.m"),
    ("hnsw-m-raised-over-default-ef", tenant(tenant_spec(rag={"hnsw": {"m": 48}})),
     "rag.hnsw.efConstruction must be at least twice rag.hnsw.m"),
    # --- dedicated database
    ("storage-size-abc", tenant(silo_spec(database={"storage": {"size": "abc"}})), BAD_SIZE),
    ("storage-size-0", tenant(silo_spec(database={"storage": {"size": "0"}})), BAD_SIZE),
    ("storage-size-negative", tenant(silo_spec(database={"storage": {"size": "-1Gi"}})),
     BAD_SIZE),
    ("storage-without-size", tenant(silo_spec(database={"storage": {
        "storageClassName": "fast"}})), "spec.database.storage.size: Required value"),
    ("resources-requests-gpu", tenant(silo_spec(database={
        "storage": {"size": "10Gi"},
        "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": 1}}})), ONLY_CPU_MEM),
    ("resources-limits-gpu", tenant(silo_spec(database={
        "storage": {"size": "10Gi"},
        "resources": {"limits": {"memory": "4Gi", "nvidia.com/gpu": 1}}})), ONLY_CPU_MEM),
    # --- network
    ("egress-cidr-prefix-33", tenant(tenant_spec(network={
        "allowEgressCIDRs": ["10.0.0.0/33"]})), BAD_CIDR),
    ("egress-cidr-bare-ip", tenant(tenant_spec(network={
        "allowEgressCIDRs": ["10.0.0.1"]})), BAD_CIDR),
    ("ingress-namespace-bad-name", tenant(tenant_spec(network={
        "allowIngressFromNamespaces": ["Team_A"]})),
     "spec.network.allowIngressFromNamespaces[0] in body should match"),
    ("ingress-namespace-duplicate", tenant(tenant_spec(network={
        "allowIngressFromNamespaces": ["apps", "apps"]})),
     'spec.network.allowIngressFromNamespaces[1]: Duplicate value: "apps"'),
    # --- API keys
    ("apiKeys-duplicate-name", tenant(tenant_spec(apiKeys=[{"name": "app"}, {"name": "app"}])),
     'spec.apiKeys[1]: Duplicate value: {"name":"app"}'),
    ("apiKeys-name-uppercase", tenant(tenant_spec(apiKeys=[{"name": "App"}])),
     "spec.apiKeys[0].name in body should match"),
    ("apiKeys-name-64-chars", tenant(tenant_spec(apiKeys=[{"name": "a" * 64}])),
     "spec.apiKeys[0].name: Too long"),
    ("apiKeys-without-name", tenant(tenant_spec(apiKeys=[{"expiresAt": "2030-01-01T00:00:00Z"}])),
     "spec.apiKeys[0].name: Required value"),
    ("apiKeys-expiresAt-not-a-time", tenant(tenant_spec(apiKeys=[
        {"name": "app", "expiresAt": "tomorrow"}])),
     "spec.apiKeys[0].expiresAt in body must be of type date-time"),
    ("apiKeys-33-keys", tenant(tenant_spec(apiKeys=[{"name": f"k{i}"} for i in range(33)])),
     "spec.apiKeys: Too many: 33: must have at most 32 items"),
    ("apiKeys-unknown-field", tenant(tenant_spec(apiKeys=[{"name": "app", "key": "sk-x"}])),
     'unknown field "spec.apiKeys[0].key"'),
    # --- TenantPlan
    ("plan-missing-spec", {"apiVersion": API_VERSION, "kind": "TenantPlan",
                           "metadata": {"name": PROBE_PLAN}}, "spec: Required value"),
    ("plan-missing-model", f"""\
apiVersion: {API_VERSION}
kind: TenantPlan
metadata: {{name: {PROBE_PLAN}}}
spec:
  displayName: No model
  budgets: {{dailyTokens: 10, monthlyTokens: 100}}
""", "spec.model: Required value"),
    ("plan-daily-over-monthly", plan(plan_spec(budgets={
        "dailyTokens": 2000, "monthlyTokens": 1000})),
     "budgets.dailyTokens must not exceed budgets.monthlyTokens"),
    ("plan-daily-over-default-monthly", plan(plan_spec(budgets={"dailyTokens": 2000000})),
     "budgets.dailyTokens must not exceed budgets.monthlyTokens"),
    ("plan-maxTokens-over-tpm", plan(plan_spec(
        maxTokensPerRequest=8192, rateLimits={"tokensPerMinute": 4096})),
     "maxTokensPerRequest must not exceed rateLimits.tokensPerMinute"),
    ("plan-price-3.0.0", f"""\
apiVersion: {API_VERSION}
kind: TenantPlan
metadata: {{name: {PROBE_PLAN}}}
spec:
  model: claude-sonnet-4-5
  billing: {{overagePricePerMillionTokens: "3.0.0"}}
""", "spec.billing.overagePricePerMillionTokens in body should match"),
    ("plan-currency-lowercase", plan(plan_spec(billing={"currency": "usd"})),
     "spec.billing.currency in body should match"),
    ("plan-allowedIsolation-empty", plan(plan_spec(allowedIsolation=[])),
     "spec.allowedIsolation in body should have at least 1 items"),
    ("plan-allowedIsolation-enum", plan(plan_spec(allowedIsolation=["pool", "dedicated"])),
     'spec.allowedIsolation[1]: Unsupported value: "dedicated"'),
    ("plan-allowedIsolation-duplicate", plan(plan_spec(allowedIsolation=["pool", "pool"])),
     'spec.allowedIsolation[1]: Duplicate value: "pool"'),
    ("plan-rpm-zero", plan(plan_spec(rateLimits={"requestsPerMinute": 0})),
     "spec.rateLimits.requestsPerMinute in body should be greater than or equal to 1"),
    ("plan-tier-negative", plan(plan_spec(tier=-1)),
     "spec.tier in body should be greater than or equal to 0"),
    ("plan-tier-over-100", plan(plan_spec(tier=101)),
     "spec.tier in body should be less than or equal to 100"),
    ("plan-tier-string", plan(plan_spec(tier="gold")), "spec.tier: Invalid value"),
    ("plan-failOpen-string", plan(plan_spec(budgets={"failOpen": "yes"})),
     "spec.budgets.failOpen: Invalid value"),
]
INVALID_IDS = [case[0] for case in INVALID]

# Values that the schema alone would admit although what the operator builds from them is
# refused by the API server (StatefulSet quantities, NetworkPolicy CIDRs, StorageClass names)
# or cannot be used at all (a host-less URL, a plan that no planRef can name).
FINDINGS: list[tuple[str, Manifest | str, str]] = [
    ("resources-value-not-a-quantity", tenant(silo_spec(database={
        "storage": {"size": "10Gi"}, "resources": {"requests": {"cpu": "lots"}}})),
     "spec.database.resources.requests"),
    ("resources-value-negative", tenant(silo_spec(database={
        "storage": {"size": "10Gi"}, "resources": {"limits": {"memory": "-4Gi"}}})),
     "spec.database.resources.limits"),
    ("endpoint-url-without-host", tenant(tenant_spec(ai={"endpoint": {
        "type": "dedicated", "url": "https://", "secretRef": {"name": "k"}}})), BAD_URL),
    ("egress-cidr-host-bits-set", tenant(tenant_spec(network={
        "allowEgressCIDRs": ["10.0.0.1/8"]})), "spec.network.allowEgressCIDRs[0]"),
    ("storageClassName-not-a-name", tenant(silo_spec(database={"storage": {
        "size": "10Gi", "storageClassName": "Fast SSD!"}})),
     "spec.database.storage.storageClassName"),
    ("plan-name-not-a-dns-label", plan(plan_spec(), name="pro.v2"), "metadata.name"),
]

# Boundary values that must stay accepted, so that a tightened rule cannot reject them unnoticed.
VALID_EDGES: list[tuple[str, Manifest | str]] = [
    ("name-40-chars", tenant(tenant_spec(), name="a" + "0" * 39)),
    ("name-1-char", tenant(tenant_spec(), name="z")),
    ("embeddingDimensions-1-and-topK-1", tenant(tenant_spec(rag={
        "embeddingDimensions": 1, "topK": 1}))),
    ("embeddingDimensions-2000-and-topK-50", tenant(tenant_spec(rag={
        "embeddingDimensions": 2000, "topK": 50}))),
    ("hnsw-minimums", tenant(tenant_spec(rag={"hnsw": {"m": 2, "efConstruction": 4}}))),
    ("hnsw-efConstruction-exactly-2m", tenant(tenant_spec(rag={"hnsw": {
        "m": 100, "efConstruction": 200}}))),
    ("budgets-equal-and-zero", tenant(tenant_spec(ai={"budgets": {
        "dailyTokens": 0, "monthlyTokens": 0, "overageAllowed": True}}))),
    ("maxTokens-equal-tpm", tenant(tenant_spec(ai={
        "maxTokensPerRequest": 4096, "rateLimits": {"tokensPerMinute": 4096}}))),
    ("dedicated-http-in-cluster", tenant(tenant_spec(ai={"model": "claude-sonnet-4-5",
        "endpoint": {"type": "dedicated", "url": "http://llm.models.svc.cluster.local:8080/v1",
                     "secretRef": {"name": "llm.key", "key": "API_KEY"}}}))),
    ("explicit-shared-endpoint", tenant(tenant_spec(ai={"endpoint": {"type": "shared"}}))),
    ("network-ipv4-and-ipv6", tenant(tenant_spec(network={
        "allowEgressCIDRs": ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"],
        "allowIngressFromNamespaces": ["ingress-nginx", "a"]}))),
    ("empty-region", tenant(tenant_spec(dataResidency={"region": ""}))),
    ("silo-small-storage-integer-resources", tenant(silo_spec(database={
        "storage": {"size": "500Mi"},
        "resources": {"requests": {"cpu": 1, "memory": "512Mi"},
                      "limits": {"cpu": "1500m", "memory": "1Gi"}}}))),
    ("suspended-delete-policy", tenant(tenant_spec(suspended=True, deletionPolicy="Delete"))),
    ("apiKeys-32-with-expiry", tenant(tenant_spec(apiKeys=[
        {"name": f"k{i}", "expiresAt": "2030-01-31T12:00:00+01:00"} for i in range(31)]
        + [{"name": "a" * 63}]))),
    ("plan-all-isolation-levels", plan(plan_spec(
        allowedIsolation=["pool", "bridge", "silo"],
        billing={"overagePricePerMillionTokens": "123456789.123456", "currency": "EUR"}))),
    ("plan-daily-equals-monthly", plan(plan_spec(budgets={
        "dailyTokens": 1000000, "monthlyTokens": 1000000}))),
    ("plan-tier-100-fail-open", plan(plan_spec(tier=100, budgets={"failOpen": True}))),
]


@pytest.fixture(scope="module")
def dry_runs(control_plane: ControlPlane) -> dict[str, Proc]:
    """Every table's manifest dry-run concurrently once; each test then reports its own case."""
    cases = [(c[0], c[1]) for c in [*INVALID, *FINDINGS]] + VALID_EDGES
    with ThreadPoolExecutor(max_workers=8) as pool:
        procs = pool.map(lambda case: dry_run(control_plane, case[1]), cases)
        return dict(zip([c[0] for c in cases], procs, strict=True))


def test_tables_are_well_formed() -> None:
    assert len(INVALID) >= 30
    ids = [c[0] for c in [*INVALID, *FINDINGS, *VALID_EDGES]]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    bodies = [to_yaml(c[1]) for c in [*INVALID, *FINDINGS, *VALID_EDGES]]
    assert len(set(bodies)) == len(bodies), "two cases send the same manifest"


def assert_rejected(result: Proc, manifest: Manifest | str, expected: str) -> None:
    assert result.returncode != 0, (
        f"the API server accepted an invalid manifest:\n{to_yaml(manifest)}\n{result.stdout}")
    assert "is invalid" in result.stderr or "unknown field" in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize(("case_id", "manifest", "expected"), INVALID, ids=INVALID_IDS)
def test_invalid_manifest_is_rejected(dry_runs: dict[str, Proc], case_id: str,
                                      manifest: Manifest | str, expected: str) -> None:
    assert_rejected(dry_runs[case_id], manifest, expected)


@pytest.mark.parametrize(("case_id", "manifest", "expected"), FINDINGS,
                         ids=[c[0] for c in FINDINGS])
def test_unusable_value_is_rejected(dry_runs: dict[str, Proc], case_id: str,
                                    manifest: Manifest | str, expected: str) -> None:
    assert_rejected(dry_runs[case_id], manifest, expected)


@pytest.mark.parametrize(("case_id", "manifest"), VALID_EDGES, ids=[c[0] for c in VALID_EDGES])
def test_boundary_manifest_is_accepted(dry_runs: dict[str, Proc], case_id: str,
                                       manifest: Manifest | str) -> None:
    result = dry_runs[case_id]
    assert result.returncode == 0, f"{case_id} rejected:\n{result.stderr}"
    assert "created (server dry run)" in result.stdout, result.stdout


# --------------------------------------------------------------------------------- 3. transitions

RAISED_ONLY = "isolation may only be raised (pool -> bridge -> silo), never lowered in place"
STORAGE = {"storage": {"size": "10Gi", "storageClassName": "local-fake"}}

# (id, initial spec, change merged into the spec, expected error fragment or None if accepted)
TRANSITIONS: list[tuple[str, Manifest, Manifest, str | None]] = [
    ("pool-to-bridge", tenant_spec(isolation="pool"), {"isolation": "bridge"}, None),
    ("pool-to-silo", tenant_spec(), {"isolation": "silo", "database": STORAGE}, None),
    ("bridge-to-silo", tenant_spec(isolation="bridge"),
     {"isolation": "silo", "database": STORAGE}, None),
    ("bridge-to-pool", tenant_spec(isolation="bridge"), {"isolation": "pool"}, RAISED_ONLY),
    ("silo-to-bridge", tenant_spec(isolation="silo", database=STORAGE),
     {"isolation": "bridge"}, RAISED_ONLY),
    ("silo-to-pool", tenant_spec(isolation="silo", database=STORAGE),
     {"isolation": "pool"}, RAISED_ONLY),
    ("region-set-when-unset", tenant_spec(), {"dataResidency": {"region": "eu-west"}}, None),
    ("region-change", tenant_spec(dataResidency={"region": "eu-west"}),
     {"dataResidency": {"region": "us-east"}}, "dataResidency.region is immutable"),
    ("embeddingDimensions-change", tenant_spec(), {"rag": {"embeddingDimensions": 768}},
     "rag.embeddingDimensions is immutable"),
    ("topK-change", tenant_spec(), {"rag": {"topK": 12}}, None),
    ("storage-shrink", tenant_spec(isolation="silo", database=STORAGE),
     {"database": {"storage": {"size": "5Gi"}}}, "database.storage.size may grow but never shrink"),
    ("storage-grow", tenant_spec(isolation="silo", database=STORAGE),
     {"database": {"storage": {"size": "20Gi"}}}, None),
    ("storage-same-size-other-unit", tenant_spec(isolation="silo", database=STORAGE),
     {"database": {"storage": {"size": "10240Mi"}}}, None),
    ("storageClassName-change", tenant_spec(isolation="silo", database=STORAGE),
     {"database": {"storage": {"storageClassName": "fast-ssd"}}},
     "database.storage.storageClassName is immutable"),
]


def assert_contains(actual: Any, expected: Any, path: str = "spec") -> None:
    """Every key of expected is in actual with the same value (actual may have more keys)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {actual!r} is not an object"
        for key, value in expected.items():
            assert key in actual, f"{path}.{key} missing in {actual!r}"
            assert_contains(actual[key], value, f"{path}.{key}")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


@pytest.mark.parametrize(("case_id", "initial", "change", "error"), TRANSITIONS,
                         ids=[t[0] for t in TRANSITIONS])
def test_update_transition_rules(objects: Objects, case_id: str, initial: Manifest,
                                 change: Manifest, error: str | None) -> None:
    name = unique("tr")
    created = objects.apply(tenant(initial, name=name))
    assert created.returncode == 0, created.stderr
    before = objects.get("tenant", name)["spec"]

    updated = objects.apply(tenant(deep_merge(initial, change), name=name))
    after = objects.get("tenant", name)["spec"]
    if error is None:
        assert updated.returncode == 0, updated.stderr
        assert_contains(after, change)
    else:
        assert updated.returncode != 0, f"{case_id}: the update was accepted: {after}"
        assert error in updated.stderr, updated.stderr
        assert after == before, "a rejected update must leave the stored spec unchanged"


def test_transition_rules_also_guard_merge_patch(objects: Objects) -> None:
    """The same rules hold for `kubectl patch`, not only for apply."""
    name = unique("tr")
    assert objects.apply(tenant(tenant_spec(isolation="bridge"), name=name)).returncode == 0
    patched = objects.plane.kubectl("patch", "tenant", name, "--type=merge",
                                    "-p", json.dumps({"spec": {"isolation": "pool"}}),
                                    check=False)
    assert patched.returncode != 0
    assert RAISED_ONLY in patched.stderr, patched.stderr
    raised = objects.plane.kubectl("patch", "tenant", name, "--type=merge",
                                   "-p", json.dumps({"spec": {"isolation": "silo",
                                                             "database": STORAGE}}),
                                   check=False)
    assert raised.returncode == 0, raised.stderr
    assert objects.get("tenant", name)["spec"]["isolation"] == "silo"


# A transition rule on a field only runs when the field exists in both the old and the new
# object, so removing it must be refused by a rule one level up (see spec's rules).
@pytest.mark.parametrize(("initial", "removed"), [
    pytest.param(tenant_spec(dataResidency={"region": "eu-west"}),
                 {"dataResidency": {}}, id="region-removed"),
    pytest.param(tenant_spec(isolation="silo", database=STORAGE),
                 {"database": {"storage": {"size": "10Gi"}}}, id="storageClassName-removed"),
])
def test_immutable_field_cannot_be_removed(objects: Objects, initial: Manifest,
                                           removed: Manifest) -> None:
    name = unique("tr")
    assert objects.apply(tenant(initial, name=name)).returncode == 0
    spec = copy.deepcopy(initial)
    spec.update(removed)
    result = objects.apply(tenant(spec, name=name))
    assert result.returncode != 0, f"removal accepted: {objects.get('tenant', name)['spec']}"
    assert "immutable" in result.stderr, result.stderr


# --------------------------------------------------------------------------------- 4. kubectl UX


def explain(plane: ControlPlane, *args: str, phrase: str) -> str:
    """`kubectl explain` output, waiting briefly for the CRD's OpenAPI to be published."""
    deadline = time.monotonic() + 30
    while True:
        result = plane.kubectl("explain", *args, check=False)
        text = one_line(result.stdout)
        if (result.returncode == 0 and phrase in text) or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return text
        time.sleep(1)


@pytest.mark.parametrize(("field", "phrases"), [
    ("tnt.spec.isolation", ["KIND: Tenant", "FIELD: isolation <string>",
                            "rows in shared tables protected by row-level security",
                            "May be raised, never lowered"]),
    ("tenants.spec.ai.endpoint", ["The model endpoint requests are routed to.",
                                  "Base URL of the dedicated Messages API endpoint",
                                  "secretRef <Object>"]),
    ("tenants.spec.ai.budgets", ["Token budgets; counted as input plus output tokens.",
                                 "dailyTokens <integer>", "monthlyTokens <integer>"]),
    ("tenantplans.spec.billing", ["KIND: TenantPlan", "Commercial terms used by the usage rollup",
                                  "ISO 4217 currency code"]),
    ("tenantplans.spec.budgets.failOpen", ["failOpen <boolean>", "without any budget check",
                                           "spend during an outage is unchecked"]),
    ("tenantplans.spec.tier", ["tier <integer>", "Admission priority under saturation"]),
], ids=["tnt.spec.isolation", "tenants.spec.ai.endpoint", "tenants.spec.ai.budgets",
        "tenantplans.spec.billing", "tenantplans.spec.budgets.failOpen", "tenantplans.spec.tier"])
def test_explain_shows_crd_descriptions(control_plane: ControlPlane, field: str,
                                        phrases: list[str]) -> None:
    text = explain(control_plane, field, phrase=phrases[-1])
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in `kubectl explain {field}`:\n{text}"


def test_explain_recursive_lists_nested_fields(control_plane: ControlPlane) -> None:
    text = explain(control_plane, "tenant.spec", "--recursive", phrase="efConstruction")
    for field in ("planRef", "dataResidency", "endpoint", "secretRef", "embeddingDimensions",
                  "efConstruction", "storageClassName", "allowEgressCIDRs", "deletionPolicy"):
        assert f"{field} <" in text, f"{field} missing from explain --recursive"


def test_get_by_short_name_shows_printer_columns(objects: Objects) -> None:
    name = unique("cols")
    assert objects.apply(tenant(tenant_spec(isolation="bridge"), name=name)).returncode == 0
    out = objects.plane.kubectl("get", "tnt", name).stdout.splitlines()
    assert out[0].split() == ["NAME", "PLAN", "ISOLATION", "PHASE", "READY", "AGE"]
    assert out[1].split()[:3] == [name, "free", "bridge"]
    listed = objects.plane.kubectl("get", "tnt", "-o", "name").stdout.split()
    assert f"tenant.tenantry.dev/{name}" in listed
    categories = objects.plane.kubectl("get", "tenantry", "-o", "name").stdout.split()
    assert f"tenant.tenantry.dev/{name}" in categories


def test_get_plan_by_short_name_shows_printer_columns(objects: Objects) -> None:
    name = f"crd-cols-{uuid.uuid4().hex[:8]}"
    spec = plan_spec(budgets={"monthlyTokens": 5000000}, rateLimits={"requestsPerMinute": 42})
    assert objects.apply(plan(spec, name=name)).returncode == 0
    out = objects.plane.kubectl("get", "tplan", name).stdout.splitlines()
    assert out[0].split() == ["NAME", "MODEL", "MONTHLY", "RPM", "AGE"]
    assert out[1].split()[:4] == [name, "claude-haiku-4-5", "5000000", "42"]


# --------------------------------------------------------------------------------- 5. descriptions


def undocumented(schema: Manifest, path: str, seen: list[str]) -> Iterator[str]:
    """Paths of properties under schema without a description (root metadata and the values of
    int-or-string maps are exempt: the API server documents the first, the second are values)."""
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if path == "" and name == "metadata":
            continue
        seen.append(here)
        if not str(sub.get("description") or "").strip():
            yield here
        yield from undocumented(sub, here, seen)
    items = schema.get("items")
    if isinstance(items, dict):
        yield from undocumented(items, f"{path}[]", seen)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and not extra.get("x-kubernetes-int-or-string"):
        yield from undocumented(extra, f"{path}{{}}", seen)


@pytest.mark.parametrize("path", CRD_FILES, ids=[p.name for p in CRD_FILES])
def test_every_schema_property_has_a_description(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    versions = crd["spec"]["versions"]
    assert versions, f"{path.name} defines no versions"
    for version in versions:
        schema = version["schema"]["openAPIV3Schema"]
        assert str(schema.get("description") or "").strip(), "root schema has no description"
        seen: list[str] = []
        missing = list(undocumented(schema, "", seen))
        assert ".spec.planRef" in seen or ".spec.model" in seen, "the walk did not reach spec"
        assert len(seen) >= 15, f"only {len(seen)} properties walked: {seen}"
        assert not missing, f"{path.name} {version['name']}: no description on {missing}"


def test_description_walk_reports_missing_descriptions() -> None:
    schema = {"type": "object", "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "description": "d", "properties": {
            "plain": {"type": "string"},
            "list": {"type": "array", "description": "d", "items": {
                "type": "object", "properties": {"inner": {"type": "string"}}}},
            "map": {"type": "object", "description": "d", "additionalProperties": {
                "type": "object", "properties": {"value": {"type": "string"}}}},
            "quantities": {"type": "object", "description": "d", "additionalProperties": {
                "x-kubernetes-int-or-string": True}},
            "blank": {"type": "string", "description": "  "},
        }},
    }}
    seen: list[str] = []
    assert list(undocumented(schema, "", seen)) == [
        ".spec.plain", ".spec.list[].inner", ".spec.map{}.value", ".spec.blank"]
    assert ".metadata" not in seen
