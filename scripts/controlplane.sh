#!/usr/bin/env bash
# Prints the path of a folder holding a Kubernetes control plane and KEDA built from source: etcd,
# kube-apiserver, kube-controller-manager, kubectl, KEDA's operator, metrics apiserver and admission
# webhooks (bin/), kubectl alone (path/), and KEDA's CRDs and RBAC (keda/config/). Built once from the Go modules pinned under
# controlplane/ (their go.mod and go.sum), and cached under $ABQ_CACHE_DIR (default ~/.cache/abqueue)
# by the hash of those files, this script and the Go toolchain's version: ~25 minutes on 2 cores the
# first time, seconds after. `abq k8s up` runs what it builds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ABQ_CACHE_DIR:-$HOME/.cache/abqueue}
log() { echo "[controlplane] $*" >&2; }

if ! command -v go > /dev/null; then
    log "no Go toolchain on PATH: install Go 1.26 or later (https://go.dev/dl/) to build the control plane"
    exit 3
fi
mkdir -p "$cache"
key=$( (cat "$0" "$root"/controlplane/*/go.mod "$root"/controlplane/*/go.sum "$root"/controlplane/*/*.go; go version) | sha256sum | cut -c1-12)
out="$cache/controlplane-$key"
if [ -f "$out/.complete" ]; then
    echo "$out"
    exit 0
fi

# Go's module and build caches live beside the binaries' cache, not in ~/go, and only the module proxy
# is asked for sources; every module's hash is checked against the go.sum files here.
export GOMODCACHE=${GOMODCACHE:-$cache/go/mod} GOCACHE=${GOCACHE:-$cache/go/build}
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath" GOTOOLCHAIN=local
work=$(mktemp -d "$cache/controlplane-build.XXXXXX")
trap 'chmod -R u+w "$work" 2> /dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/bin"
start=$SECONDS
step() { log "$1 (+$((SECONDS - start)) s)"; }

kube=v1.36.4
step "building etcd (about 1 minute)"
(cd "$root/controlplane/etcd" && go build -ldflags "-s -w" -o "$work/bin/etcd" .)

step "building kube-apiserver, kube-controller-manager and kubectl $kube (about 10 minutes the first time)"
kv="-X k8s.io/component-base/version.gitVersion=$kube -X k8s.io/client-go/pkg/version.gitVersion=$kube"
kv="$kv -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitTreeState=clean"
(cd "$root/controlplane/kubernetes" && go build -ldflags "-s -w $kv" -o "$work/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
# kubectl alone in a folder of its own, for a PATH (`abq k8s env`): the client of the server's version.
mkdir -p "$work/path" && ln -s ../bin/kubectl "$work/path/kubectl"

# KEDA builds with its own go.mod and go.sum (its dependencies' versions differ from Kubernetes'), so
# its module's source is copied out of the (read-only) module cache and built in place.
keda=$(sed -n 's/^require github.com\/kedacore\/keda\/v2 \(v[0-9.]*\)$/\1/p' "$root/controlplane/keda/go.mod")
step "building KEDA $keda: operator, metrics apiserver, webhooks (about 15 minutes the first time)"
src=$(cd "$root/controlplane/keda" && go mod download -json "github.com/kedacore/keda/v2@$keda" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
cp -r "$src" "$work/keda-src" && chmod -R u+w "$work/keda-src"
kdv="-X=github.com/kedacore/keda/v2/version.Version=${keda#v} -X=github.com/kedacore/keda/v2/version.GitCommit=$keda"
(cd "$work/keda-src" && go build -ldflags "-s -w $kdv" -o "$work/bin/keda-operator" ./cmd/operator \
    && go build -ldflags "-s -w $kdv" -o "$work/bin/keda-adapter" ./cmd/adapter \
    && go build -ldflags "-s -w $kdv" -o "$work/bin/keda-webhooks" ./cmd/webhooks)
mkdir -p "$work/keda" && cp -r "$work/keda-src/config" "$work/keda/config"
rm -rf "$work/keda-src"

touch "$work/.complete"
rm -rf "$out" && mv "$work" "$out"
trap - EXIT
step "built in $out"
echo "$out"
