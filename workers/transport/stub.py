"""An in-memory broker for unit tests of the worker loop (after dramatiq's brokers/stub.py).

It keeps topics, partitions, committed offsets and transactions in memory and behaves as the worker
relies on Kafka to behave: records in partition order, paused partitions not fetched, commits per
group, a transaction's records and offsets visible together or not at all. Faults are injected by
the test: sends that are not acknowledged, transactions that abort, rebalances mid-flight.

It is for the loop's logic only. Everything that claims something about Kafka itself is tested
against a real broker (tests/conftest.py).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from kafka import TopicPartition
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    UnknownTopicOrPartitionError,
)

from abqueue.kafka.topics import DEFAULT_MAX_MESSAGE_BYTES, record_size
from workers.transport import Offsets


class StubRecord(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class _Sent:
    """A send's outcome, like kafka-python's FutureRecordMetadata: done at once, unless the broker
    holds acknowledgements (`StubBroker.hold_acks`), when it is done once they are let go."""

    def __init__(self, record: StubRecord | None = None, error: KafkaError | None = None, acked=None):
        self.record, self.error = record, error
        self._acked: threading.Event | None = acked

    @property
    def is_done(self) -> bool:
        return self._acked is None or self._acked.is_set()

    def get(self, timeout: float | None = None) -> StubRecord | None:
        if not self.is_done:
            assert self._acked is not None
            if not self._acked.wait(timeout):
                raise KafkaTimeoutError("stub: not acknowledged within the timeout")
        if self.error is not None:
            raise self.error
        return self.record


class StubBroker:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._logs: dict[str, list[list[StubRecord]]] = {}
        self._max_bytes: dict[str, int] = {}
        self.committed: dict[str, Offsets] = {}  # group -> commit points
        self._send_faults: list[tuple[str | None, KafkaError]] = []
        self._transaction_faults: list[KafkaError] = []
        self.refused = 0  # sends not acknowledged so far
        self.unreachable = False  # while True, listing topics fails as an admin client would
        self._acks: threading.Event | None = None  # while set, sends are written but not yet acknowledged
        self._commits: threading.Event | None = None  # while set, transaction commits wait for it
        self.committing = 0  # transaction commits waiting now

    # -- what tests set up and read --------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        with self._lock:
            self._logs.setdefault(name, [[] for _ in range(partitions)])
            self._max_bytes[name] = max_message_bytes

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> StubRecord:
        with self._lock:
            parts = self._logs[topic]
            if partition is None:
                partition = zlib.crc32(key) % len(parts) if key else 0
            log = parts[partition]
            record = StubRecord(topic, partition, len(log), int(time.time() * 1000), key, value, list(headers or []))
            log.append(record)
            self._lock.notify_all()
            return record

    def delete_topic(self, name: str) -> None:
        with self._lock:
            self._logs.pop(name, None)
            self._max_bytes.pop(name, None)

    def records(self, topic: str) -> list[StubRecord]:
        with self._lock:
            return [r for part in self._logs.get(topic, []) for r in part]

    def end_offsets(self, topic: str) -> Offsets:
        with self._lock:
            return {TopicPartition(topic, p): len(log) for p, log in enumerate(self._logs[topic])}

    def fail_sends(self, times: int = 1, topic: str | None = None, error: KafkaError | None = None) -> None:
        """The next `times` sends (to `topic`, or any) are not acknowledged."""
        with self._lock:
            self._send_faults += [(topic, error or KafkaTimeoutError("stub: not acknowledged"))] * times

    def hold_acks(self) -> None:
        """From now on sends are written (readers see them) but not acknowledged until `release_acks`,
        as with a slow ISR under acks=all."""
        with self._lock:
            self._acks = threading.Event()

    def release_acks(self) -> None:
        with self._lock:
            if self._acks is not None:
                self._acks.set()
            self._acks = None
            self._lock.notify_all()

    def hold_commits(self) -> None:
        """From now on a transaction's commit waits until `release_commits`, as a slow coordinator's would."""
        with self._lock:
            self._commits = threading.Event()

    def release_commits(self) -> None:
        with self._lock:
            if self._commits is not None:
                self._commits.set()
            self._commits = None

    def clear_faults(self) -> None:
        with self._lock:
            self._send_faults, self._transaction_faults = [], []

    def fail_transactions(self, times: int = 1, error: KafkaError | None = None) -> None:
        """The next `times` transaction commits fail (and must be aborted)."""
        with self._lock:
            self._transaction_faults += [error or KafkaTimeoutError("stub: transaction commit timed out")] * times

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        """Waits until `condition()` holds (checked on every change to the broker), or fails."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"stub broker: {what} did not happen within {timeout}s")
                self._lock.wait(min(left, 0.05))

    # -- clients ---------------------------------------------------------------------------------
    def consumer(self, group: str, max_poll_interval_s: float = 300.0) -> StubConsumer:
        return StubConsumer(self, group, max_poll_interval_s)

    def producer(self, transactional_id: str | None = None) -> StubProducer:
        return StubProducer(self, transactional_id)

    # -- used by the clients ---------------------------------------------------------------------
    def _partitions(self, topics: list[str]) -> set[TopicPartition]:
        with self._lock:
            return {TopicPartition(t, p) for t in topics for p in range(len(self._logs.get(t, [])))}

    def _refusal(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> KafkaError | None:
        for i, (only, error) in enumerate(self._send_faults):
            if only is None or only == topic:
                del self._send_faults[i]
                self.refused += 1
                self._lock.notify_all()
                return error
        if topic not in self._logs:
            return UnknownTopicOrPartitionError(f"stub: no topic {topic}")
        if record_size(key, value, headers) > self._max_bytes[topic]:
            return MessageSizeTooLargeError(f"stub: record over {topic}'s max.message.bytes")
        return None

    def _append(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> _Sent:
        with self._lock:
            if (error := self._refusal(topic, key, value, headers)) is not None:
                return _Sent(error=error, acked=self._acks)
            return _Sent(self.produce(topic, value, key, headers), acked=self._acks)

    def _commit(self, group: str, offsets: Offsets) -> None:
        with self._lock:
            self.committed.setdefault(group, {}).update(offsets)
            self._lock.notify_all()

    def _transaction_fault(self) -> KafkaError | None:
        with self._lock:
            return self._transaction_faults.pop(0) if self._transaction_faults else None


class StubConsumer:
    """One member alone in its group: it gets every partition of what it subscribes to at its first
    poll, from the group's commit point (or the beginning). `rebalance` moves partitions away and
    back, running the callbacks inside the next poll as kafka-python does."""

    def __init__(self, broker: StubBroker, group: str, max_poll_interval_s: float, max_wait_ms: int = 20):
        self.broker, self.group = broker, group
        self.max_poll_interval_s = max_poll_interval_s
        self.max_wait_s = max_wait_ms / 1000  # a stopping worker never waits long in poll
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._position: dict[TopicPartition, int] = {}
        self._topics: list[str] = []
        self._callbacks: tuple[Callable, Callable] | None = None
        self._pending: list[tuple[set[TopicPartition], set[TopicPartition]]] = []
        self.closed = False
        self.rejoins = 0

    def subscribe(self, topics, on_revoked, on_assigned) -> None:
        self._topics, self._callbacks = list(topics), (on_revoked, on_assigned)
        self._pending.append((set(), self.broker._partitions(self._topics)))

    def strand(self) -> None:
        """What kafka-python was seen doing once: the member holds nothing from its next poll on and
        is never given its partitions again, until it rejoins."""
        self._pending.append((set(self._assigned), set()))

    def rebalance(self, revoke: set[TopicPartition], assign: set[TopicPartition]) -> None:
        """At the next poll: revoke these partitions, then assign those (eagerly, like range assignment)."""
        self._pending.append((set(revoke), set(assign)))

    def _apply_rebalances(self) -> None:
        assert self._callbacks is not None, "poll before subscribe"
        on_revoked, on_assigned = self._callbacks
        while self._pending:
            revoke, assign = self._pending.pop(0)
            if revoke:
                on_revoked(revoke & self._assigned)
                self._assigned -= revoke
            committed = self.broker.committed.get(self.group, {})
            for tp in assign:
                self._position[tp] = committed.get(tp, 0)
            self._assigned |= assign
            on_assigned(assign)

    def poll(self, timeout_ms: int, max_records: int) -> list[StubRecord]:
        self._apply_rebalances()
        deadline = time.monotonic() + min(timeout_ms / 1000, self.max_wait_s)
        with self.broker._lock:
            while True:
                out: list[StubRecord] = []
                for tp in sorted(self._assigned - self._paused):
                    log = self.broker._logs[tp.topic][tp.partition]
                    take = log[self._position[tp] : self._position[tp] + max_records - len(out)]
                    self._position[tp] += len(take)
                    out += take
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                self.broker._lock.wait(left)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._position[partition] = offset

    def commit(self, offsets: Offsets) -> None:
        self.broker._commit(self.group, offsets)

    def commit_async(self, offsets: Offsets, callback: Callable[[Offsets, Exception | None], None]) -> None:
        self.broker._commit(self.group, offsets)
        callback(offsets, None)

    def group_metadata(self) -> Any:
        return self.group

    def close(self) -> None:
        self.closed = True

    def unowned_partitions(self) -> set[TopicPartition]:
        return self.broker._partitions(self._topics) - self._assigned  # alone in its group

    def rejoin(self) -> None:
        self.rejoins += 1
        self._pending.append((set(self._assigned), self.broker._partitions(self._topics)))


class StubProducer:
    def __init__(self, broker: StubBroker, transactional_id: str | None = None):
        self.broker, self.transactional_id = broker, transactional_id
        self._transaction: list[tuple[str, bytes | None, bytes, list]] | None = None
        self._fatal: KafkaError | None = None
        self._offsets: tuple[Any, Offsets] | None = None
        self.transactions = {"committed": 0, "aborted": 0}

    def send(self, topic, key, value, headers) -> _Sent:
        if self._transaction is None:
            return self.broker._append(topic, key, value, headers)
        self._transaction.append((topic, key, value, headers))
        return _Sent()

    def flush(self, timeout: float | None = None) -> None:
        acks = self.broker._acks
        if acks is not None and not acks.wait(timeout):
            raise KafkaTimeoutError("stub: flush timed out with sends unacknowledged")

    def max_message_bytes(self, topics: list[str]) -> dict[str, int]:
        return {t: self.broker._max_bytes.get(t, DEFAULT_MAX_MESSAGE_BYTES) for t in topics}

    def topic_names(self) -> set[str]:
        if self.broker.unreachable:
            raise KafkaTimeoutError("stub: the broker does not answer")
        with self.broker._lock:
            return set(self.broker._logs)

    def fence(self) -> None:
        """Another producer took this transactional id: every transactional call fails from now on,
        as kafka-python's do (a generic KafkaError naming the fatal error)."""
        self._fatal = ProducerFencedError()

    def fatal_error(self) -> KafkaError | None:
        return self._fatal

    def _check(self) -> None:
        if self._fatal is not None:
            raise KafkaError(f"Cannot execute transactional method because we are in an error state: {self._fatal!r}")

    def init_transactions(self) -> None:
        assert self.transactional_id, "a transactional producer needs a transactional id"

    def begin_transaction(self) -> None:
        self._check()
        assert self._transaction is None, "a transaction is already open"
        self._transaction, self._offsets = [], None

    def send_offsets_to_transaction(self, offsets: Offsets, group_metadata: Any) -> None:
        self._offsets = (group_metadata, dict(offsets))

    def commit_transaction(self) -> None:
        self._check()
        assert self._transaction is not None, "no open transaction"
        if (held := self.broker._commits) is not None:
            with self.broker._lock:
                self.broker.committing += 1
                self.broker._lock.notify_all()
            held.wait()
            with self.broker._lock:
                self.broker.committing -= 1
        if (error := self.broker._transaction_fault()) is not None:
            raise error
        with self.broker._lock:  # records and offsets become visible together, or none of them
            for record in self._transaction:
                if (error := self.broker._refusal(*record)) is not None:
                    raise error
            for topic, key, value, headers in self._transaction:
                self.broker.produce(topic, value, key, headers)
            if self._offsets is not None:
                self.broker._commit(*self._offsets)
        self._transaction, self._offsets = None, None
        self.transactions["committed"] += 1

    def abort_transaction(self) -> None:
        self._check()
        self._transaction, self._offsets = None, None
        self.transactions["aborted"] += 1

    def close(self, timeout: float = 10.0) -> None:
        pass
