"""Reading a whole topic as it stands now: every record from the beginning to the end offsets taken
at the start (committed records only), for configs, rollout state and reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from kafka import TopicPartition

from abqueue.errors import AbqError
from abqueue.kafka.clients import consumer
from abqueue.kafka.settings import KafkaSettings


class PartialRead(AbqError):
    """A topic could not be read to its end: what was read is not handed out as if it were all."""


def read_to_end(settings: KafkaSettings, topic: str, timeout_s: float = 30.0) -> list:
    """The topic's records in partition order; [] if it does not exist (see `iter_to_end`)."""
    return list(iter_to_end(settings, topic, timeout_s))


def iter_to_end(
    settings: KafkaSettings, topic: str, timeout_s: float = 30.0, progress: Callable[[int, int], None] | None = None
) -> Iterator:
    """The topic's records as they are read, so a caller keeps only what it makes of them. However
    large the topic, the read goes on while records keep coming; it fails (PartialRead) only when
    none came for `timeout_s` before the end was reached. progress(read, total) after each poll."""
    c = consumer(settings, group_id=None, isolation_level="read_committed")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            return
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        total = sum(ends[tp] - c.position(tp) for tp in tps)  # from where the log begins now
        read = 0
        last_progress = time.monotonic()
        while any(c.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() - last_progress > timeout_s:
                raise PartialRead(
                    f"read {read} of about {total} records of topic {topic}, then nothing for {timeout_s:.0f}s; "
                    "check that the broker answers and retry"
                )
            for recs in c.poll(timeout_ms=200).values():
                read += len(recs)
                last_progress = time.monotonic()
                yield from recs
            if progress is not None:
                progress(read, total)
    finally:
        c.close()
