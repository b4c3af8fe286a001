//go:build tools

// Package tools pins cyclonus, the NetworkPolicy analyzer that evaluates the policies rendered
// for tenant namespaces in tests/test_network_policies.py.
package tools

import _ "github.com/mattfenwick/cyclonus/cmd/cyclonus"
