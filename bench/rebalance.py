"""How long a consumer group takes to settle when one member is busy (polls without a wait, as a
worker does while it has work): kafka-python 3.0.12 alone against the same with abqueue's
`join_before_polling`, in turns, in one run on one broker.

Two cases, each timed from its cause until every member holds its new share:
  - a second member joins a group whose one member holds both partitions;
  - a partition is added to the busy member's topic (learned from metadata read every 0.5 s here).
A case that has not settled after --give-up-s seconds counts as that many, and is reported as stuck.
Joins are counted from each member's first (the median of the rounds).

Run:  python bench/rebalance.py [--rounds 3] [--give-up-s 30]
Uses ABQ_BOOTSTRAP_SERVERS / KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
import uuid

from common import bootstrap, leave_no_trace
from kafka import TopicPartition
from kafka.admin import NewPartitions, NewTopic

from abqueue.kafka import KafkaSettings, admin_client, join_before_polling
from workers.transport import kafka as transport

PREFIX = "abq.bench-rebalance"
WAYS = {"kafka-python alone": lambda _consumer: None, "join_before_polling": join_before_polling}


class Joins(logging.Handler):
    """Counts the joins kafka-python reports, of every consumer in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Successfully joined group" in record.getMessage()


def new_topic(settings: KafkaSettings, partitions: int) -> str:
    name = f"{PREFIX}.{uuid.uuid4().hex[:8]}"
    admin = admin_client(settings)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


def member(settings: KafkaSettings, topic: str, name: str) -> transport.KafkaConsumerTransport:
    c = transport.KafkaConsumerTransport(settings, f"{topic}.group", client_id=name, max_poll_records=1)
    c.subscribe([topic], lambda _: None, lambda _: None)
    return c


def settle(busy, settled, give_up_s: float, also=None) -> float:
    """Polls `busy` as a busy worker does until `settled()`; `also` polls with a wait beside it."""
    stop = threading.Event()

    def poll_beside() -> None:
        while not stop.is_set():
            also.poll(100, 1)

    beside = threading.Thread(target=poll_beside, daemon=True) if also is not None else None
    if beside is not None:
        beside.start()
    start = time.monotonic()
    try:
        while not settled() and time.monotonic() - start < give_up_s:
            busy.poll(0, 1)
            time.sleep(0.002)  # the engine's step between two polls
        return time.monotonic() - start
    finally:
        stop.set()
        if beside is not None:
            beside.join()


def holding_all(c, partitions: int) -> None:
    deadline = time.monotonic() + 60
    while not (c.poll(1000, 1) == [] and len(c.assignment()) == partitions):
        if time.monotonic() > deadline:
            raise SystemExit("a lone member never got its partitions: is the broker well?")


def a_member_joins(settings: KafkaSettings, give_up_s: float) -> float:
    topic = new_topic(settings, 2)
    a = member(settings, topic, "busy")
    holding_all(a, 2)
    b = member(settings, topic, "joining")
    try:
        return settle(a, lambda: len(a.assignment()) == len(b.assignment()) == 1, give_up_s, also=b)
    finally:
        a.close()
        b.close()


def a_partition_is_added(settings: KafkaSettings, give_up_s: float) -> float:
    topic = new_topic(settings, 1)
    a = member(settings, topic, "busy")
    try:
        holding_all(a, 1)
        admin = admin_client(settings)
        try:
            admin.create_partitions({topic: NewPartitions(total_count=2)})
        finally:
            admin.close()
        both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        return settle(a, lambda: a.assignment() == both, give_up_s)
    finally:
        a.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--give-up-s", type=float, default=30.0)
    args = ap.parse_args()
    addr, broker = bootstrap()
    leave_no_trace(PREFIX)
    settings = KafkaSettings(bootstrap_servers=addr)
    transport.METADATA_MAX_AGE_MS = 500  # so that an added partition is seen at once, in both ways
    joins = Joins()
    logging.getLogger("kafka.coordinator").addHandler(joins)
    logging.getLogger("kafka.coordinator").setLevel(logging.INFO)
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    try:
        for r in range(args.rounds):
            for case in (a_member_joins, a_partition_is_added):
                ways = list(WAYS.items()) if r % 2 == 0 else list(WAYS.items())[::-1]
                for way, hook in ways:
                    transport.join_before_polling = hook
                    before = joins.count
                    took = case(settings, args.give_up_s)
                    results.setdefault((case.__name__, way), []).append((took, joins.count - before))
                    print(f"round {r + 1}: {case.__name__.replace('_', ' ')}, {way}: {took:.1f} s", flush=True)
    finally:
        if broker is not None:
            broker.stop()
    print(f"\n{'case':<22} {'way':<20} {'median s':>9} {'stuck':>6} {'joins in all':>13}")
    for (case, way), runs in results.items():
        stuck = sum(took >= args.give_up_s for took, _ in runs)
        print(
            f"{case.replace('_', ' '):<22} {way:<20} {statistics.median(t for t, _ in runs):>9.1f} "
            f"{stuck:>3}/{len(runs):<2} {statistics.median(j for _, j in runs):>13.0f}"
        )
    print(f"\nrerun: python bench/rebalance.py --rounds {args.rounds} --give-up-s {args.give_up_s:g}")


if __name__ == "__main__":
    main()
