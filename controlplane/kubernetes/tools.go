//go:build tools

// Package tools keeps the control plane's commands in go.mod, so that `go mod tidy` pins every module
// they need in go.sum; scripts/controlplane.sh builds them from here.
package tools

import (
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)
