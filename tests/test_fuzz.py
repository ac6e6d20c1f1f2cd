"""Hostile input never hurts a worker: hypothesis throws records at a worker through the real broker
(random bytes, JSON of random shapes, nearly valid requests, keys and headers of every kind), and
every record ends answered or dead-lettered with a reason, the worker alive, its commits at the end.
ABQ_FUZZ_EXAMPLES sets the number of examples (default 150, each a batch of 1 to 6 records);
bench/fuzz.py runs the same at scale."""

import os

import pytest
from fuzz_harness import FuzzTarget, records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("ABQ_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def target(request):
    kafka_settings = request.getfixturevalue("settings")
    t = FuzzTarget(kafka_settings)
    yield t
    t.close()
    print(f"\nfuzz: {t.records} records, outcomes {dict(t.outcomes)}")


# The worker runs in threads of this process, where kafka-python draws backoff jitter from `random`
# while hypothesis draws a batch; hypothesis takes that for a strategy using `random` and warns.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_every_hostile_record_is_answered_or_dead_lettered_and_the_worker_lives(target, data):
    target.check(data.draw(st.lists(records(target.exp.name), min_size=1, max_size=6)))
