"""A local Kubernetes control plane with KEDA, for operators and the tests: see controlplane.py."""
