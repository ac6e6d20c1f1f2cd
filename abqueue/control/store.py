"""A compacted Kafka topic as a store of keyed state: the latest value of each key wins, and the
topic keeps earlier ones until compaction (min.compaction.lag.ms decides how long). Live experiment
configs and rollout state both live in one of these."""

from __future__ import annotations

import logging
import time
from typing import Generic, TypeVar

from kafka import TopicPartition
from pydantic import BaseModel

from abqueue.kafka import KafkaSettings, consumer, ensure_topic, producer
from abqueue.kafka.reader import read_to_end
from schemas import encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class KeyedStore(Generic[M]):
    def __init__(self, topic: str, model: type[M], topic_configs: dict[str, str] | None = None):
        self.topic, self.model = topic, model
        self.topic_configs = {"cleanup.policy": "compact", **(topic_configs or {})}

    def ensure(self, settings: KafkaSettings) -> None:
        ensure_topic(settings, self.topic, configs=self.topic_configs)

    def parse(self, value: bytes | None, where: str) -> M | None:
        """A stored value, or None for a deletion or a record that is not one (logged and skipped)."""
        if value is None:
            return None
        try:
            return self.model.model_validate_json(value)
        except ValueError as e:
            log.warning("skipping an unreadable record in %s at %s: %s", self.topic, where, str(e).splitlines()[0])
            return None

    def history(
        self, settings: KafkaSettings, key: str | None = None, timeout_s: float = 10.0
    ) -> list[tuple[str, M | None]]:
        """Every record still in the topic, oldest first (of one key, if given); None marks a deletion."""
        out: list[tuple[str, M | None]] = []
        for r in read_to_end(settings, self.topic, timeout_s):
            name = r.key.decode(errors="replace") if r.key else ""
            if key is not None and name != key:
                continue
            value = self.parse(r.value, f"offset {r.offset}")
            if value is not None or r.value is None:
                out.append((name, value))
        return out

    def latest(self, settings: KafkaSettings, key: str) -> M | None:
        """The current value of `key`; None if it was never set, or deleted."""
        versions = self.history(settings, key)
        return versions[-1][1] if versions else None

    def put(self, settings: KafkaSettings, key: str, value: M) -> None:
        """Store `value` under `key` and wait until Kafka has it."""
        self.ensure(settings)
        p = producer(settings)
        try:
            p.send(self.topic, key=key.encode(), value=encode(value)).get(timeout=30)
        finally:
            p.close()

    def tail(self, settings: KafkaSettings, keys: set[str]) -> StoreTail[M]:
        """A reader of `keys`' latest values that reads the topic once and then only what is new."""
        return StoreTail(self, settings, keys)


class StoreTail(Generic[M]):
    """The latest values of some keys of a KeyedStore, kept up to date by reading on from where the
    last read stopped: a controller that asks every tick reads each record once, not the whole topic
    (which grows by a heartbeat every few seconds) again and again."""

    def __init__(self, store: KeyedStore[M], settings: KafkaSettings, keys: set[str]):
        self.store, self.keys = store, keys
        self.values: dict[str, M | None] = {}
        self.read = 0  # records read so far, of every key
        store.ensure(settings)
        self._c = consumer(settings, group_id=None, isolation_level="read_committed")
        self._tps = [TopicPartition(store.topic, p) for p in sorted(self._c.partitions_for_topic(store.topic) or ())]
        self._c.assign(self._tps)
        self._c.seek_to_beginning(*self._tps)

    def latest(self, key: str, timeout_s: float = 10.0) -> M | None:
        """`key`'s value as of now: everything up to the topic's current end is read first."""
        ends = self._c.end_offsets(self._tps)
        until = time.monotonic() + timeout_s
        while any(self._c.position(tp) < ends[tp] for tp in self._tps) and time.monotonic() < until:
            for recs in self._c.poll(timeout_ms=200).values():
                for r in recs:
                    self.read += 1
                    name = r.key.decode(errors="replace") if r.key else ""
                    if name in self.keys:
                        self.values[name] = self.store.parse(r.value, f"offset {r.offset}")
        return self.values.get(key)

    def close(self) -> None:
        self._c.close()
