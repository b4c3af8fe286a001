//go:build tools

// Package tools pins helm, which lints and renders charts/tenantry in the chart tests.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
