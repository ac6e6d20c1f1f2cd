"""Sticky, weighted variant assignment.

A routing key hashes into one of 10,000 buckets (stable across processes, hosts and Python
versions). Variants own consecutive bucket ranges in config order, sized by weight (1 bucket =
0.01%). So the same key always lands on the same variant while weights stay, and moving weight
between two neighbouring variants (control and candidate, with two variants always) only moves keys
from the one losing weight into the one gaining it.
"""

from __future__ import annotations

import hashlib

from schemas.experiment import ExperimentConfig

BUCKETS = 10_000


def bucket_of(experiment: str, routing_key: str) -> int:
    # The experiment name salts the hash so one user is not in the same slice of every experiment.
    digest = hashlib.sha256(f"{experiment}\x00{routing_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def bucket_ranges(config: ExperimentConfig) -> list[tuple[str, int, int]]:
    """(variant, first bucket, end bucket exclusive) per variant with weight > 0."""
    ranges, start = [], 0
    for v in config.variants:
        end = start + round(v.weight * BUCKETS / 100)
        if end > start:
            ranges.append((v.name, start, end))
        start = end
    return ranges


def weight_shares(config: ExperimentConfig) -> dict[str, float]:
    """The share of routing keys each variant with weight > 0 gets, as the buckets give it."""
    return {name: (end - start) / BUCKETS for name, start, end in bucket_ranges(config)}


def assign_variant(config: ExperimentConfig, routing_key: str) -> str:
    b = bucket_of(config.name, routing_key)
    for name, start, end in bucket_ranges(config):
        if start <= b < end:
            return name
    raise AssertionError("weights sum to 100, so every bucket has a variant")  # pragma: no cover


def assign(config: ExperimentConfig, routing_key: str, metadata: dict | None = None) -> tuple[str, str]:
    """(variant, assigned_by): a matching segment override first ("override:<name>"), else the
    weighted buckets ("weights"). Override traffic is not randomised, so analysis keeps it apart."""
    for o in config.overrides:
        if o.matches(metadata or {}):
            return o.variant, f"override:{o.name}"
    return assign_variant(config, routing_key), "weights"


def shadow_copies(config: ExperimentConfig, variant: str, routing_key: str) -> list[str]:
    """Shadow variants that get a copy of this request: those shadowing `variant` whose share
    covers the key's shadow bucket (salted apart from the assignment, so the sample is random
    within the variant's traffic, and sticky per key)."""
    out = []
    for v in config.variants:
        if v.shadow_of == variant:
            b = bucket_of(f"{config.name}\x00shadow:{v.name}", routing_key)
            if b < round(v.shadow_percent * BUCKETS / 100):
                out.append(v.name)
    return out
