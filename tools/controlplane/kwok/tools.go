//go:build tools

// Package tools pins kwok, which fakes a node and drives Pods to Ready without a kubelet.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
