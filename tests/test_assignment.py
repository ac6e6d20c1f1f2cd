import math

from producers.assignment import BUCKETS, assign_variant, bucket_of, bucket_ranges
from schemas import ExperimentConfig


def exp(*weights, name="e"):
    return ExperimentConfig(name=name, variants=[{"name": f"v{i}", "weight": w} for i, w in enumerate(weights)])


def test_bucket_is_stable_across_runs():
    # Fixed values: a change of hash would silently reshuffle every user of every experiment.
    assert [bucket_of("demo", f"user-{i}") for i in range(3)] == [3563, 6386, 1460]
    assert bucket_of("other", "user-1") == 9913  # the experiment name salts the hash


def test_ranges_cover_all_buckets_in_config_order():
    ranges = bucket_ranges(exp(12.34, 0, 87.66))
    assert ranges == [("v0", 0, 1234), ("v2", 1234, BUCKETS)]


def test_split_matches_weights_within_binomial_tolerance():
    e = exp(90, 10)
    n = 20_000
    b = sum(assign_variant(e, f"key-{i}") == "v1" for i in range(n))
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert abs(b - n * 0.1) < 4 * sigma


def test_raising_a_weight_only_moves_keys_into_that_variant():
    keys = [f"user-{i}" for i in range(5000)]
    before = {k: assign_variant(exp(90, 10), k) for k in keys}
    after = {k: assign_variant(exp(75, 25), k) for k in keys}
    moved = [(before[k], after[k]) for k in keys if before[k] != after[k]]
    assert moved and all(m == ("v0", "v1") for m in moved)
    # Three variants: the candidate placed next to the control takes only from the control.
    before3 = {k: assign_variant(exp(80, 10, 10), k) for k in keys}
    after3 = {k: assign_variant(exp(60, 30, 10), k) for k in keys}
    assert {(before3[k], after3[k]) for k in keys if before3[k] != after3[k]} == {("v0", "v1")}


def test_zero_weight_variant_gets_nothing():
    e = exp(100, 0)
    assert {assign_variant(e, f"k{i}") for i in range(2000)} == {"v0"}
