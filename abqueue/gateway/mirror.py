"""A compacted topic mirrored into memory: every gateway replica follows the files and batches
topics, so that any replica answers for any file or batch, and a write is visible to its writer
before the write returns (read your writes)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from kafka import TopicPartition
from pydantic import BaseModel

from abqueue.kafka import KafkaSettings, consumer, ensure_topic, producer
from schemas import encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class Mirror(Generic[M]):
    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        model: type[M],
        partitions: int = 1,
        merge: Callable[[M | None, M], M] | None = None,
    ):
        """merge(old, new): the value to keep when a record arrives (default: the new one)."""
        self.topic, self.model = topic, model
        self._merge = merge or (lambda old, new: new)
        ensure_topic(settings, topic, partitions, configs={"cleanup.policy": "compact"})
        self._values: dict[str, M] = {}
        self._seen: dict[int, int] = {}  # partition -> next offset mirrored
        self._changed = threading.Condition()
        self._listeners: list[Callable[[str, M | None], None]] = []
        self._producer = producer(settings)
        self._consumer = consumer(settings, group_id=None, fetch_max_wait_ms=100)
        self._tps = [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
        self._consumer.assign(self._tps)
        self._consumer.seek_to_beginning(*self._tps)
        ends = self._consumer.end_offsets(self._tps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mirror-{topic}", daemon=True)
        self._thread.start()
        self._wait_for({tp.partition: off for tp, off in ends.items()}, 60)

    def partition_of(self, key: str) -> int:
        """The partition Kafka's default partitioner puts `key` in (murmur2, as the Java client)."""
        from kafka.partitioner.default import murmur2

        return (murmur2(key.encode()) & 0x7FFFFFFF) % len(self._tps)

    def listen(self, callback: Callable[[str, M | None], None]) -> None:
        """callback(key, value) for every record mirrored from now on (in the mirror's thread)."""
        self._listeners.append(callback)

    def get(self, key: str) -> M | None:
        return self._values.get(key)

    def values(self) -> list[M]:
        return list(self._values.values())

    def put(self, key: str, value: M | None) -> M | None:
        """Writes `value` (None deletes) and returns once this mirror shows it: the kept value."""
        meta = self._producer.send(self.topic, key=key.encode(), value=None if value is None else encode(value)).get(30)
        self._wait_for({meta.partition: meta.offset + 1}, 30)
        return self._values.get(key)

    def _wait_for(self, offsets: dict[int, int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while any(self._seen.get(p, 0) < off for p, off in offsets.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.topic} was not read up to {offsets} within {timeout_s:g}s")
                self._changed.wait(left)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._consumer.poll(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        self._take(r)
                with self._changed:
                    for tp in self._tps:
                        self._seen[tp.partition] = self._consumer.position(tp)
                    self._changed.notify_all()
            except Exception as e:  # a mirror that dies silently would freeze every replica's view
                log.error("following %s: %s; retrying", self.topic, e)
                time.sleep(1)

    def _take(self, r) -> None:
        key = r.key.decode(errors="replace") if r.key else ""
        value: M | None = None
        if r.value is None:
            self._values.pop(key, None)
        else:
            try:
                value = self._merge(self._values.get(key), self.model.model_validate_json(r.value))
            except ValueError as e:
                log.warning(
                    "skipping an unreadable record in %s at %d: %s", self.topic, r.offset, str(e).splitlines()[0]
                )
                return
            self._values[key] = value
        for callback in self._listeners:
            try:
                callback(key, value)
            except Exception:  # one failing listener must not stop the mirror
                log.exception("a listener of %s failed on %s", self.topic, key)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()
        self._producer.close()
