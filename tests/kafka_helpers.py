"""Reading topics and committed offsets in tests, with kafka-python against the real broker."""

from __future__ import annotations

import time

from kafka import TopicPartition

from abqueue.kafka import KafkaSettings, admin_client, consumer
from schemas import DeadLetter, InferenceResponse


def read_all(
    settings: KafkaSettings,
    topic: str,
    expect: int | None = None,
    timeout: float = 30.0,
    idle: float = 1.5,
    isolation_level: str = "read_uncommitted",
):
    """Every record of `topic` from the beginning; waits for `expect` records (or `idle` s of silence)."""
    c = consumer(settings, group_id=None, isolation_level=isolation_level)
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out, deadline, last_new = [], time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = c.poll(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                # Keep reading briefly: more than expected (duplicates) must be seen, too.
                if time.monotonic() - last_new > 0.5:
                    break
            elif expect is None and time.monotonic() - last_new > idle:
                break
        return out
    finally:
        c.close()


def responses(
    settings, topic, expect=None, timeout=30.0, isolation_level="read_uncommitted"
) -> list[InferenceResponse]:
    return [
        InferenceResponse.model_validate_json(r.value)
        for r in read_all(settings, topic, expect, timeout, isolation_level=isolation_level)
    ]


def dead_letters(settings, topic, expect=None, timeout=30.0) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(r.value) for r in read_all(settings, topic, expect, timeout)]


def committed(settings, group: str, topic: str) -> dict[int, int]:
    admin = admin_client(settings)
    try:
        res = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in res.items() if tp.topic == topic}


def end_offsets(settings, topic: str) -> dict[int, int]:
    c = consumer(settings, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
        return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def wait_until(condition, timeout: float, what: str, every: float = 0.1) -> None:
    """Polls `condition` until it holds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(every)
