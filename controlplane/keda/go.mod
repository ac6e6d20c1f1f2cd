// KEDA's operator, metrics apiserver and webhooks are built from this module's source with KEDA's own
// go.mod and go.sum (its dependency versions differ from Kubernetes'); this file pins which release,
// and go.sum pins its hash. scripts/controlplane.sh does the build.
module abqueue.local/controlplane/keda

go 1.26.0

require github.com/kedacore/keda/v2 v2.21.0
