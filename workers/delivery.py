"""Delivery: what happens to finished messages, chosen once when the worker is built (the way
aiokafka's consumer picks its group coordinator once), so the loop never branches on a mode.

Both strategies track offsets per partition (workers/offsets.py) and publish through a sink:
- AtLeastOnce sends each response as it finishes without waiting for it, and once Kafka has
  acknowledged it commits asynchronously up to the lowest offset not yet answered. A crash redoes
  what was published above the commit point (the duplicate window); nothing below it is ever lost.
- ExactlyOnce holds each response until every earlier offset of its partition is answered, then
  commits the responses and their offsets in one Kafka transaction. An aborted transaction rewinds
  its partitions to their last commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RetriableError

from schemas import ConfigError
from workers.backoff import retrying
from workers.message import Message
from workers.offsets import OffsetTracker
from workers.sink import Fenced, ResponseSink, TransactionalSink, TransactionFailed

__all__ = ["DELIVERY_MODES", "AtLeastOnce", "Delivery", "ExactlyOnce", "Fenced", "make_delivery"]
from workers.transport import Consumer, Offsets, Producer

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0  # after a failed publish or an aborted transaction


def _tp(m: Message) -> TopicPartition:
    return TopicPartition(m.record.topic, m.record.partition)


class Delivery:
    name = ""
    retry_after_s = RETRY_AFTER_S

    def __init__(self, sink: ResponseSink):
        self.sink = sink
        self.tracker = OffsetTracker()
        self._held: list[Message] = []  # ready, waiting for the next try
        self._retry_at = 0.0
        self.consumer: Consumer
        self._drop_buffered: Callable[[set[TopicPartition]], None] = lambda partitions: None

    def bind(self, consumer: Consumer, drop_buffered: Callable[[set[TopicPartition]], None]) -> None:
        """The consumer whose offsets this delivers, and how to drop polled records of partitions
        that start again from their commit point."""
        self.consumer, self._drop_buffered = consumer, drop_buffered

    def received(self, messages: list[Message]) -> None:
        for m in messages:
            self.tracker.add(_tp(m), m.record.offset)

    @property
    def unsent(self) -> int:
        """Finished requests whose responses are kept here, not yet safe in Kafka: they take room
        from the engine, so that memory stays bounded however slowly publishing goes."""
        return len(self._held)

    def deliver(self, finished: list[Message]) -> list[Message]:
        """Publish what is ready; returns the messages now safe in Kafka."""
        # A revoked partition's records belong to their new owner, which will answer them itself.
        ready = [m for m in self._held + finished if self.tracker.owns(_tp(m), m.record.offset)]
        self._held = []
        if ready and time.monotonic() < self._retry_at:
            self._held, ready = ready, []
        return self._send(ready)

    def _send(self, ready: list[Message]) -> list[Message]:
        """Publish `ready` (maybe none) and return what is now safe in Kafka."""
        raise NotImplementedError

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        """Let partitions go (on kafka-python's IO thread: nothing may block). Returns where each
        should start again should it come straight back to this worker."""
        raise NotImplementedError

    def drain(self) -> None:
        """The worker is stopping: make what was delivered count."""

    def close(self) -> None:
        self.sink.close()

    def _forget(self, partitions: set[TopicPartition]) -> None:
        left = self.tracker.unanswered(partitions)
        self.tracker.forget(partitions)
        log.info("partitions revoked: %d; %d unanswered requests left to their next owner", len(partitions), left)


class AtLeastOnce(Delivery):
    name = "at-least-once"
    ACK_WAIT_S = 30.0  # how long a stopping worker waits for its last responses to be acknowledged

    def __init__(self, sink: ResponseSink):
        super().__init__(sink)
        self._sending: list[Message] = []  # sent, not yet acknowledged

    @property
    def unsent(self) -> int:
        return len(self._held) + len(self._sending)

    def _send(self, ready: list[Message]) -> list[Message]:
        # The loop never waits for acks=all: what Kafka acknowledged since the last call counts as
        # answered, and what it refused is tried again shortly with only the records it still owes.
        sent, unsendable = self.sink.send(ready)
        acked, refused, self._sending = self.sink.settle(self._sending + sent)
        if failed := unsendable + refused:
            log.error("could not publish %d responses (%s); retrying in %.1fs", len(failed), failed[0][1], self.retry_after_s)  # fmt: skip
            self._held += [m for m, _ in failed]
            self._retry_at = time.monotonic() + self.retry_after_s
        for m in acked:
            self.tracker.answer(_tp(m), m.record.offset)
        _, points = self.tracker.release()
        self.commit(points)
        return acked

    def commit(self, points: Offsets, sync: bool = False) -> None:
        """Commit points whose responses are safe. Asynchronous on the hot path: a commit that fails
        is sent again with the next one, and a crash before it lands only means redoing those records;
        synchronous where the partitions are about to change hands."""
        if not points:
            return
        if not sync:

            def landed(offsets: Offsets, error: Exception | None) -> None:
                if error is not None:
                    log.warning("commit failed (%s); it is sent again with the next one", error)
                    self.tracker.commit_failed(offsets)

            self.tracker.mark_committed(points)
            self.consumer.commit_async(points, callback=landed)
            return
        try:
            retrying("commit", RetriableError, attempts=5)(self.consumer.commit, points)
            self.tracker.mark_committed(points)
        except CommitFailedError as e:
            # The group rebalanced under us: another member owns these partitions now and will
            # consume from the last commit. Responses already published are the duplicate window.
            log.warning("commit refused after a rebalance (%s); the new owner will redo these records", e)
        except KafkaError as e:
            log.error("commit failed (%s); the next commit covers these records", e)

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        self.tracker.release()
        points = self.tracker.points(partitions)
        self._forget(partitions)
        if points:
            try:
                self.consumer.commit_async(points, callback=lambda offsets, error: None)
            except KafkaError as e:
                log.warning("could not commit revoked partitions (%s); their new owner redoes from the last commit", e)
        # kafka-python keeps a retained partition's position (past the dropped records) and its
        # paused flag across the rebalance: should one come straight back, start at its commit point.
        return points

    def drain(self) -> None:
        self.sink.flush(self.ACK_WAIT_S)
        self._send([])
        self.tracker.release()
        self.commit(self.tracker.points(), sync=True)


class ExactlyOnce(Delivery):
    name = "exactly-once"

    @property
    def unsent(self) -> int:
        return len(self._held) + self.tracker.held()  # and those held behind a slower earlier offset

    def __init__(self, sink: TransactionalSink):
        super().__init__(sink)
        self.sink: TransactionalSink = sink

    def _send(self, ready: list[Message]) -> list[Message]:
        for m in ready:
            self.tracker.answer(_tp(m), m.record.offset, m)
        # Only responses below the commit point go out: each transaction's offsets cover exactly them.
        released, points = self.tracker.release()
        if not points:
            return []
        try:
            self.sink.publish_with_offsets(released, points, self.consumer.group_metadata())
        except TransactionFailed as e:
            log.error("transaction aborted (%s); its records will be consumed again", e)
            self._rewind(set(points))
            return []
        self.tracker.mark_committed(points)
        return released  # type: ignore[return-value]

    def _rewind(self, partitions: set[TopicPartition]) -> None:
        """Start these partitions again from their last commit: buffered and in-flight work is dropped."""
        self._drop_buffered(partitions)
        assigned = self.consumer.assignment()
        for tp, point in self.tracker.restart_points(partitions).items():
            if tp in assigned:
                self.consumer.seek(tp, point)
        # Their buffered records are gone, and with them the reason they were paused: fetch them
        # again (admission pauses them anew should their level still be full).
        if again := partitions & assigned:
            self.consumer.resume(*again)
        self.tracker.forget(partitions)
        self._retry_at = time.monotonic() + self.retry_after_s

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        # Nothing is committed from here: what is unanswered is redone by the new owner.
        restart = self.tracker.restart_points(partitions)
        self._forget(partitions)
        return restart


DELIVERY_MODES = {"at-least-once": AtLeastOnce, "exactly-once": ExactlyOnce}


def make_delivery(mode: str, producer: Callable[[bool], Producer], responses: str, deadletters: str) -> Delivery:
    """The strategy for `mode`, over a producer made by `producer(transactional)`."""
    if mode not in DELIVERY_MODES:
        raise ConfigError(f"delivery {mode!r} is not one of {', '.join(DELIVERY_MODES)}")
    if mode == "exactly-once":
        return ExactlyOnce(TransactionalSink(producer(True), responses, deadletters))
    return AtLeastOnce(ResponseSink(producer(False), responses, deadletters))
