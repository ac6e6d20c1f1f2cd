"""Kubernetes manifests and KEDA ScaledObjects rendered from an experiment config, and their validation."""
