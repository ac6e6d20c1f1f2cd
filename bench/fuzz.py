"""Hostile input at scale: hypothesis draws records (random bytes, JSON of random shapes, valid and
nearly valid requests, keys and headers of every kind) and publishes them to a worker on a real
broker; every record must end answered or dead-lettered with a reason, the worker alive and its
commits at the end. The strategies are tests/fuzz_harness.py's, which tests/test_fuzz.py runs in CI.

Run:  python bench/fuzz.py [--records 10000]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from common import bootstrap, leave_no_trace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_harness import FuzzTarget, records
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from abqueue.kafka import KafkaSettings

BATCH = 5

logging.basicConfig(level=logging.ERROR)  # the worker's warnings about each bad record would drown the figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    args = ap.parse_args()
    addr, broker = bootstrap()
    target = FuzzTarget(KafkaSettings(bootstrap_servers=addr))
    leave_no_trace(f"abq.{target.exp.name}.")
    t0 = time.monotonic()
    try:

        @settings(
            max_examples=math.ceil(args.records / BATCH),
            deadline=None,
            database=None,
            phases=[Phase.generate],  # a failure is reported as found, not shrunk (that would take hours)
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def run(data):
            target.check(data.draw(st.lists(records(target.exp.name), min_size=BATCH, max_size=BATCH)))
            if target.records % 1000 < BATCH:
                print(f"  {target.records} records, {time.monotonic() - t0:.0f}s", file=sys.stderr)

        run()
    finally:
        target.close()
        if broker:
            broker.stop()
    elapsed = time.monotonic() - t0
    print(
        f"fuzz: {target.records} records in {elapsed:.0f}s ({target.records / elapsed:.0f}/s); worker alive throughout"
    )
    for outcome, n in target.outcomes.most_common():
        print(f"  {outcome:32} {n:6d}  {100 * n / target.records:5.1f}%")
    print(f"rerun: python bench/fuzz.py --records {args.records}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
