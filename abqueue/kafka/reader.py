"""Reading a whole topic as it stands now: every record from the beginning to the end offsets taken
at the start (committed records only), for configs, rollout state and reports."""

from __future__ import annotations

import time

from kafka import TopicPartition

from abqueue.kafka.clients import consumer
from abqueue.kafka.settings import KafkaSettings


def read_to_end(settings: KafkaSettings, topic: str, timeout_s: float = 30.0) -> list:
    """The topic's records in partition order; [] if it does not exist. Stops at `timeout_s`."""
    c = consumer(settings, group_id=None, isolation_level="read_committed")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out, deadline = [], time.monotonic() + timeout_s
        while any(c.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=200).values():
                out.extend(recs)
        return out
    finally:
        c.close()
