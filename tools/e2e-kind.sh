#!/usr/bin/env bash
# `make e2e-kind`: the whole platform in a kind cluster, as a user or their CI runs it.
# Creates a kind cluster, builds and loads the images, installs the chart in evaluation mode
# (bundled Postgres + Redis, NOT for production) with a local Messages-API stub as the model,
# applies pool, bridge and silo tenants and waits for Ready, calls the runtime with the official
# anthropic SDK using each tenant's key, checks its usage rows, raises one tenant's isolation,
# deletes the tenants. Needs Docker (or Podman), Go and Python with the dev dependencies
# (make venv). No container engine runs where this repository's tests run: the tests check this
# script's syntax and every file it names (tests/test_e2e_kind.py); a GitHub Actions workflow
# (.github/workflows/e2e-kind.yaml) runs it.
#
# Environment: E2E_CLUSTER (tenantry-e2e), E2E_KEEP=1 keeps the cluster, E2E_TIMEOUT (600s per
# wait), CONTAINER_ENGINE (docker), PYTHON (.venv/bin/python).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

cluster="${E2E_CLUSTER:-tenantry-e2e}"
timeout="${E2E_TIMEOUT:-600s}"
engine="${CONTAINER_ENGINE:-docker}"
python="${PYTHON:-$repo/.venv/bin/python}"
registry=tenantry.local
tag=e2e
release=tenantry
namespace=tenantry-system
runtime_namespace=tenantry-runtime  # the chart's runtimeNamespace.name
runtime_port=18080
tenants=(e2epool e2ebridge e2esilo)
state="$(mktemp -d)"
kubeconfig="$state/kubeconfig"

step() { echo; echo "==> $*"; }
fail() { echo "e2e-kind: $*" >&2; exit 1; }

"$engine" info >/dev/null 2>&1 || fail "no container engine answers ($engine info); start Docker"
[[ -x "$python" ]] || fail "$python not found; run make venv first"

step "tools: kind, kubectl and helm from their Go modules (tools/controlplane/build.sh)"
bin="$(TENANTRY_WITH_KIND=1 bash tools/controlplane/build.sh | tail -n 1)"
kind="$bin/kind" kubectl=("$bin/kubectl" "--kubeconfig=$kubeconfig") helm=("$bin/helm" "--kubeconfig=$kubeconfig")

cleanup() {
  local code=$?
  [[ -n "${forward_pid:-}" ]] && kill "$forward_pid" 2>/dev/null || true
  if (( code != 0 )) && [[ -s "$kubeconfig" ]]; then
    echo "--- what the cluster looked like when it failed" >&2
    "${kubectl[@]}" get tenants -o wide >&2 || true
    "${kubectl[@]}" get pods -A >&2 || true
    "${kubectl[@]}" -n "$namespace" logs "deployment/$release" --tail=80 >&2 || true
    "${kubectl[@]}" -n "$runtime_namespace" logs "deployment/$release-runtime" --tail=80 >&2 || true
  fi
  if [[ "${E2E_KEEP:-}" != 1 ]]; then
    KIND_EXPERIMENTAL_PROVIDER="$engine" "$kind" delete cluster --name "$cluster" >/dev/null 2>&1 || true
  else
    echo "kept: KUBECONFIG=$kubeconfig ($kind delete cluster --name $cluster)"
  fi
  exit "$code"
}
trap cleanup EXIT

step "kind cluster $cluster"
export KIND_EXPERIMENTAL_PROVIDER="$engine"
"$kind" create cluster --name "$cluster" --kubeconfig "$kubeconfig" --wait 180s

step "images $registry/{operator,runtime}:$tag (make images), loaded into kind"
make images IMAGE_REGISTRY="$registry" IMAGE_TAG="$tag" CONTAINER_ENGINE="$engine"
for image in operator runtime; do
  "$kind" load docker-image "$registry/$image:$tag" --name "$cluster"
done

step "the local Messages-API stub as the model endpoint"
"${kubectl[@]}" create namespace "$namespace"
sed "s|RUNTIME_IMAGE|$registry/runtime:$tag|" tools/e2e/upstream-stub.yaml \
  | "${kubectl[@]}" -n "$namespace" apply -f -
"${kubectl[@]}" -n "$namespace" rollout status deployment/upstream-stub --timeout="$timeout"

step "helm install in evaluation mode (charts/tenantry/ci/evaluation-values.yaml)"
"${helm[@]}" install "$release" charts/tenantry --namespace "$namespace" --wait \
  --timeout "$timeout" -f charts/tenantry/ci/evaluation-values.yaml \
  --set image.repository="$registry/operator" --set image.tag="$tag" \
  --set runtime.image.repository="$registry/runtime" --set runtime.image.tag="$tag" \
  --set runtime.upstream.url="http://upstream-stub.$namespace.svc:8001" \
  --set-json 'runtime.networkPolicy.extraEgress=[{"ports":[{"port":8001,"protocol":"TCP"}]}]'

step "pool, bridge and silo tenants (tools/e2e/tenants.yaml), until Ready"
"${kubectl[@]}" apply -f tools/e2e/tenants.yaml
for tenant in "${tenants[@]}"; do
  "${kubectl[@]}" wait "tenant/$tenant" --for=jsonpath='{.status.phase}'=Ready --timeout="$timeout"
done
"${kubectl[@]}" get tenants

step "each tenant's app calls the runtime with the anthropic SDK; its usage rows appear"
"${kubectl[@]}" -n "$runtime_namespace" port-forward "service/$release-runtime" "$runtime_port:80" \
  >"$state/port-forward.log" 2>&1 &
forward_pid=$!
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$runtime_port/readyz" >/dev/null 2>&1 && break
  sleep 1
done
PYTHONPATH="$repo/operator:$repo/runtime:$repo/tools" "$python" -m tenantry_devenv.e2e_calls \
  --kubectl "$bin/kubectl" --kubeconfig "$kubeconfig" \
  --runtime-url "http://127.0.0.1:$runtime_port" "${tenants[@]}"

step "raise e2epool from pool to bridge; its data moves and it answers again"
"${kubectl[@]}" patch tenant e2epool --type=merge -p '{"spec":{"isolation":"bridge"}}'
"${kubectl[@]}" wait tenant/e2epool --for=jsonpath='{.status.migration.step}'=Done --timeout="$timeout"
"${kubectl[@]}" wait tenant/e2epool --for=jsonpath='{.status.phase}'=Ready --timeout="$timeout"
PYTHONPATH="$repo/operator:$repo/runtime:$repo/tools" "$python" -m tenantry_devenv.e2e_calls \
  --kubectl "$bin/kubectl" --kubeconfig "$kubeconfig" \
  --runtime-url "http://127.0.0.1:$runtime_port" e2epool

step "delete the tenants (deletionPolicy: Delete); their namespaces go with them"
"${kubectl[@]}" delete -f tools/e2e/tenants.yaml --wait=true --timeout="$timeout"
for tenant in "${tenants[@]}"; do
  "${kubectl[@]}" wait "namespace/tenant-$tenant" --for=delete --timeout="$timeout" || true
  if "${kubectl[@]}" get namespace "tenant-$tenant" >/dev/null 2>&1; then
    fail "namespace tenant-$tenant is still there"
  fi
done

step "e2e-kind passed"
