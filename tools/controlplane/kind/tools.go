//go:build tools

// Package tools pins kind, which `make e2e-kind` (tools/e2e-kind.sh) uses to run the whole
// platform in Docker; build.sh builds it only with TENANTRY_WITH_KIND=1.
package tools

import _ "sigs.k8s.io/kind"
