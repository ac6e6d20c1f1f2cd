"""The transport over kafka-python: a group consumer and a producer (transactional where asked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.structs import OffsetAndMetadata

from abqueue.kafka import (
    FetchPark,
    KafkaSettings,
    admin_client,
    consumer,
    join_before_polling,
    producer,
    release_parked_records,
    topic_max_message_bytes,
)
from abqueue.kafka.topics import RECORD_OVERHEAD
from workers.transport import Offsets, Record

# How old kafka-python's view of the topics may grow. Partitions added to a request topic (to run more
# replicas) belong to no member until the group's leader sees them in its metadata: at kafka-python's
# default of five minutes, requests on them waited that long. A metadata request every 10 s is cheap.
METADATA_MAX_AGE_MS = 10_000


def _with_metadata(offsets: Offsets) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_revoked, on_assigned):
        self.on_revoked, self.on_assigned = on_revoked, on_assigned

    def on_partitions_revoked(self, revoked):
        self.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned):
        self.on_assigned(set(assigned))


class KafkaConsumerTransport:
    def __init__(
        self,
        settings: KafkaSettings,
        group: str,
        client_id: str,
        max_poll_records: int,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
    ):
        self.max_poll_interval_s = max_poll_interval_ms / 1000
        self._settings, self._group = settings, group
        self._subscription: tuple[list[str], _Listener] | None = None
        self._make = lambda: consumer(
            settings,
            group_id=group,
            client_id=client_id,
            max_poll_records=max_poll_records,
            max_poll_interval_ms=max_poll_interval_ms,
            # A worker killed without leaving the group holds its partitions this long: short, so a
            # replacement picks them up quickly (kafka-python's default is 45 s).
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1000, session_timeout_ms // 4),
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            # Requests published inside another pipeline's transaction count only once committed.
            isolation_level="read_committed",
            # Range splits each priority topic among the workers on its own; cooperative-sticky
            # balances the partition count over all topics and can leave a worker with only empty
            # priority levels (seen in tests), which costs more than the work an eager move drops.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self._consumer = self._make()
        self.park = FetchPark(self._consumer)

    def subscribe(self, topics, on_revoked, on_assigned) -> None:
        self._subscription = (list(topics), _Listener(on_revoked, on_assigned))
        self._consumer.subscribe(self._subscription[0], listener=self._subscription[1])

    def unowned_partitions(self) -> set[TopicPartition]:
        # Asked of the brokers: kafka-python's own view of the group and the topics is what may be stuck.
        assert self._subscription is not None, "unowned_partitions before subscribe"
        admin = admin_client(self._settings)
        try:
            group = admin.describe_groups([self._group])[self._group]
            if group["group_state"] not in ("Stable", "Empty", "Dead"):  # Dead: no such group (yet)
                return set()
            owned = {
                TopicPartition(a["topic"], p)
                for m in group["members"]
                for a in (m.get("member_assignment") or {}).get("assigned_partitions", [])
                for p in a["partitions"]
            }
            topics = admin.describe_topics(self._subscription[0])
        finally:
            admin.close()
        every = {
            TopicPartition(t["name"], p["partition_index"])
            for t in topics
            if t["error_code"] == 0
            for p in t["partitions"]
        }
        return every - owned

    def rejoin(self) -> None:
        assert self._subscription is not None, "rejoin before subscribe"
        self.close()
        self._consumer = self._make()
        self.park = FetchPark(self._consumer)
        self._consumer.subscribe(self._subscription[0], listener=self._subscription[1])

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        release_parked_records(self._consumer)
        join_before_polling(self._consumer)
        polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        records = [r for records in polled.values() for r in records]
        self.park.polled(bool(records))
        return records

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def pause(self, *partitions: TopicPartition) -> None:
        self._consumer.pause(*partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._consumer.resume(*partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(partition, offset)

    def commit(self, offsets: Offsets) -> None:
        self._consumer.commit(_with_metadata(offsets))

    def commit_async(self, offsets: Offsets, callback: Callable[[Offsets, Exception | None], None]) -> None:
        def landed(_sent, result):
            callback(offsets, result if isinstance(result, Exception) else None)

        self._consumer.commit_async(_with_metadata(offsets), callback=landed)

    def group_metadata(self) -> Any:
        return self._consumer.group_metadata()

    def close(self) -> None:
        self._consumer.close(autocommit=False)  # leaves the group now, so a rebalance starts at once


class KafkaProducerTransport:
    """acks=all, idempotent; transactional when given a transactional id. `limit_topics` are the
    topics whose max.message.bytes the producer must be able to send up to."""

    def __init__(self, settings: KafkaSettings, limit_topics: list[str], **overrides: Any):
        self._settings = settings
        self._limits = topic_max_message_bytes(settings, limit_topics)
        self._producer = producer(settings, max_request_size=max(self._limits.values()) + RECORD_OVERHEAD, **overrides)

    def send(self, topic, key, value, headers):
        return self._producer.send(topic, key=key, value=value, headers=headers)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=timeout)

    def max_message_bytes(self, topics: list[str]) -> dict[str, int]:
        known = {t: self._limits[t] for t in topics if t in self._limits}
        missing = [t for t in topics if t not in known]
        return {**known, **(topic_max_message_bytes(self._settings, missing) if missing else {})}

    def topic_names(self) -> set[str]:
        admin = admin_client(self._settings)
        try:
            return set(admin.list_topics())
        finally:
            admin.close()

    def init_transactions(self) -> None:
        self._producer.init_transactions()

    def begin_transaction(self) -> None:
        self._producer.begin_transaction()

    def send_offsets_to_transaction(self, offsets: Offsets, group_metadata: Any) -> None:
        self._producer.send_offsets_to_transaction(_with_metadata(offsets), group_metadata)

    def commit_transaction(self) -> None:
        self._producer.commit_transaction()

    def abort_transaction(self) -> None:
        self._producer.abort_transaction()

    def fatal_error(self) -> Exception | None:
        # kafka-python reports a fenced producer as a generic KafkaError on every later call; the
        # fatal error itself is kept by its transaction manager.
        manager = getattr(self._producer, "_transaction_manager", None)
        if manager is None or not manager.has_fatal_error():
            return None
        return manager._last_error

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)
