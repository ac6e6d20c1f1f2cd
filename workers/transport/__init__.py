"""The worker's view of Kafka: the few consumer-side and producer-side operations it uses.

`kafka` adapts kafka-python to these; `stub` is an in-memory broker for fast unit tests of the
loop (after dramatiq's brokers/stub.py). The stub never replaces the real-broker integration tests:
it adds a fast layer under them. Errors are kafka-python's types in both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from kafka import TopicPartition


class Record(Protocol):
    """One consumed record (kafka-python's ConsumerRecord has these and more)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # milliseconds
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class SendResult(Protocol):
    is_done: bool  # acknowledged or failed

    def get(self, timeout: float | None = None) -> Any: ...


Offsets = dict[TopicPartition, int]
"""Commit points: the next offset to consume, per partition."""


class Consumer(Protocol):
    max_poll_interval_s: float

    def subscribe(
        self,
        topics: list[str],
        on_revoked: Callable[[set[TopicPartition]], None],
        on_assigned: Callable[[set[TopicPartition]], None],
    ) -> None:
        """Join the group; the callbacks run inside poll() when partitions change hands and must not block."""

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]: ...

    def assignment(self) -> set[TopicPartition]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def commit(self, offsets: Offsets) -> None:
        """Synchronous; raises CommitFailedError after a rebalance, KafkaError otherwise."""

    def commit_async(self, offsets: Offsets, callback: Callable[[Offsets, Exception | None], None]) -> None: ...

    def group_metadata(self) -> Any:
        """What a transaction needs to commit this group's offsets (KIP-447)."""

    def close(self) -> None:
        """Leave the group now, committing nothing."""

    def unowned_partitions(self) -> set[TopicPartition]:
        """Partitions of the subscribed topics that no member of the group holds, as the brokers see
        it; none while the group rebalances."""

    def rejoin(self) -> None:
        """Leave the group and join it again with a fresh client, keeping the subscription and its
        callbacks."""


class Producer(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> SendResult: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def max_message_bytes(self, topics: list[str]) -> dict[str, int]:
        """The largest record each topic accepts."""

    def topic_names(self) -> set[str]:
        """The topics that exist now."""

    def init_transactions(self) -> None: ...

    def begin_transaction(self) -> None: ...

    def send_offsets_to_transaction(self, offsets: Offsets, group_metadata: Any) -> None: ...

    def commit_transaction(self) -> None: ...

    def abort_transaction(self) -> None: ...

    def fatal_error(self) -> Exception | None:
        """The error that ended this transactional producer for good (fenced), if any."""

    def close(self, timeout: float = 10.0) -> None: ...
