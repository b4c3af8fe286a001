#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm and
# cyclonus (a NetworkPolicy analyzer) and promtool from Go modules into a cache directory keyed by
# version; prints that directory.
# A second run finds the binaries and builds nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache_root="${TENANTRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tenantry}"
bin_dir="$cache_root/controlplane/kube-${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
mkdir -p "$bin_dir"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { echo "[controlplane] $*" >&2; }

build() { # build <module dir> <package> <output name> [ldflags]
  local out="$bin_dir/$3"
  if [[ -x "$out" ]]; then return; fi
  log "building $3 (first run only; cached in $bin_dir)"
  (cd "$here/$1" && go build -trimpath -ldflags "-s -w ${4:-}" -o "$out.tmp" "$2")
  mv "$out.tmp" "$out"
}

kube_major_minor="${KUBE_VERSION#v}"
kv="k8s.io/component-base/version"
kube_ldflags="-X $kv.gitVersion=${KUBE_VERSION} -X $kv.gitMajor=${kube_major_minor%%.*}"
kube_ldflags+=" -X $kv.gitMinor=$(echo "$kube_major_minor" | cut -d. -f2) -X $kv.gitTreeState=clean"
kube_ldflags+=" -X $kv.buildDate=1970-01-01T00:00:00Z"
kube_ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=${KUBE_VERSION}"
kube_ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=${kube_major_minor%%.*}"
kube_ldflags+=" -X k8s.io/client-go/pkg/version.gitMinor=$(echo "$kube_major_minor" | cut -d. -f2)"

build etcd go.etcd.io/etcd/server/v3 etcd
build kwok sigs.k8s.io/kwok/cmd/kwok kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build kube "k8s.io/kubernetes/cmd/$cmd" "$cmd" "$kube_ldflags"
done
# kwok needs Stage objects to drive Nodes and Pods; take the "fast" stages from the pinned module.
if [[ ! -s "$bin_dir/kwok-stages.yaml" ]]; then
  kwok_dir="$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  for f in "$kwok_dir"/kustomize/stage/node/fast/node-initialize.yaml \
           "$kwok_dir"/kustomize/stage/pod/fast/pod-{ready,complete,delete}.yaml; do
    cat "$f"; echo "---"
  done > "$bin_dir/kwok-stages.yaml.tmp"
  mv "$bin_dir/kwok-stages.yaml.tmp" "$bin_dir/kwok-stages.yaml"
fi
# helm renders and lints charts/tenantry in tests/test_chart.py; its version comes from helm/go.mod,
# and the binary is named by it so a bump rebuilds instead of reusing a stale helm.
gomod_version() { sed -n "s|^\(require \)\?[[:space:]]*$1 \(v[^ ]*\).*|\2|p" "$here/${2:-helm}/go.mod"; }
helm_version="$(gomod_version helm.sh/helm/v3)"
# Like helm's Makefile: the Kubernetes version `helm template` assumes follows client-go (v0.N -> 1.N).
client_go_minor="$(gomod_version k8s.io/client-go | cut -d. -f2)"
hv="helm.sh/helm/v3/internal/version"
helm_ldflags="-X $hv.version=${helm_version} -X $hv.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${client_go_minor}"
done
build helm helm.sh/helm/v3/cmd/helm "helm-${helm_version}" "$helm_ldflags"
ln -sfn "helm-${helm_version}" "$bin_dir/helm"
# cyclonus evaluates the NetworkPolicies rendered for tenant namespaces offline
# (tests/test_network_policies.py); named by its version like helm.
cyclonus_version="$(gomod_version github.com/mattfenwick/cyclonus netpol)"
build netpol github.com/mattfenwick/cyclonus/cmd/cyclonus "cyclonus-${cyclonus_version}"
ln -sfn "cyclonus-${cyclonus_version}" "$bin_dir/cyclonus"
# promtool checks and unit-tests the chart's PrometheusRules (tests/test_monitoring.py); named by
# its module version like helm. The module's v0.3MM.P is Prometheus v3.MM.P.
prom_module="$(sed -n "s|^\(require \)\?[[:space:]]*github.com/prometheus/prometheus \(v[^ ]*\).*|\2|p" \
  "$here/promtool/go.mod")"
prom_minor="${prom_module#v0.}"
prom_version="3.$((10#${prom_minor%%.*} - 300)).${prom_minor#*.}"
build promtool github.com/prometheus/prometheus/cmd/promtool "promtool-${prom_module}" \
  "-X github.com/prometheus/common/version.Version=${prom_version}"
ln -sfn "promtool-${prom_module}" "$bin_dir/promtool"
# promql-names lists the metric names PromQL expressions read, with the same parser; named by a
# hash of its source and go.mod, so an edit rebuilds it.
names_hash="$(cat "$here/promtool/promql-names/main.go" "$here/promtool/go.mod" | sha1sum | cut -c1-12)"
build promtool ./promql-names "promql-names-${names_hash}"
ln -sfn "promql-names-${names_hash}" "$bin_dir/promql-names"
# kind runs the whole platform in Docker for `make e2e-kind` only (no container engine here).
if [[ "${TENANTRY_WITH_KIND:-}" == 1 ]]; then
  kind_version="$(sed -n "s|^require sigs.k8s.io/kind \(v[^ ]*\)|\1|p" "$here/kind/go.mod")"
  build kind sigs.k8s.io/kind "kind-${kind_version}"
  ln -sfn "kind-${kind_version}" "$bin_dir/kind"
fi
echo "$bin_dir"
