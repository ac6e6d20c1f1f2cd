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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import cast

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

    @property
    def awaiting(self) -> bool:
        """Whether anything sent is still to be confirmed by Kafka (the loop polls briefly meanwhile)."""
        return self.unsent > 0

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` while what was sent becomes safe (the loop has nothing else to do)."""
        time.sleep(timeout)

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

    def drain(self) -> list[Message]:
        """The worker is stopping: make what was delivered count. Returns the messages that became
        safe in Kafka while draining."""
        return []

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

    def drain(self) -> list[Message]:
        self.sink.flush(self.ACK_WAIT_S)
        delivered = self._send([])
        self.tracker.release()
        self.commit(self.tracker.points(), sync=True)
        return delivered


class ExactlyOnce(Delivery):
    """One transaction commits at a time, in its own thread, while the loop serves on; the next
    carries every response released meanwhile (group commit). At low load that is one response
    per transaction, sent at once; under load each covers what finished during the last one."""

    name = "exactly-once"
    TXN_WAIT_S = 30.0  # how long a rebalance or a stopping worker waits for the transaction in flight

    def __init__(self, sink: TransactionalSink):
        super().__init__(sink)
        self.sink: TransactionalSink = sink
        self._released: list[Message] = []  # below their commit point, for the next transaction
        self._points: Offsets = {}  # commit points moved since the last transaction began
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="abq-transactions")
        self._txn: tuple[Future, list[Message], Offsets] | None = None  # the transaction in flight

    @property
    def unsent(self) -> int:
        # ...and those held behind a slower earlier offset, and those waiting for the next transaction.
        # Not the transaction in flight's: they are the committing thread's now, and at most one
        # window's worth (they were all counted here when it began). Counted, they took the engine's
        # room while it committed: a worker draining a backlog idled a third of the time.
        return len(self._held) + self.tracker.held() + len(self._released)

    @property
    def awaiting(self) -> bool:
        return self._txn is not None or self.unsent > 0

    def _send(self, ready: list[Message]) -> list[Message]:
        for m in ready:
            self.tracker.answer(_tp(m), m.record.offset, m)
        # Only responses below the commit point go out: each transaction's offsets cover exactly them.
        released, points = self.tracker.release()
        self._released += cast(list[Message], released)
        # A point in the transaction in flight is reported again until that commits: not news.
        in_flight = self._txn[2] if self._txn else {}
        self._points.update({tp: p for tp, p in points.items() if p > in_flight.get(tp, -1)})
        delivered = self._settle()
        if self._txn is None and self._points and time.monotonic() >= self._retry_at:
            batch, points, self._released, self._points = self._released, self._points, [], {}
            future = self._committer.submit(
                self.sink.publish_with_offsets, batch, points, self.consumer.group_metadata()
            )
            self._txn = (future, batch, points)
        return delivered

    def _settle(self) -> list[Message]:
        """The transaction in flight, if it has ended: its messages if it committed; if it aborted,
        its partitions start again from their last commit. Fenced is raised: the worker must stop."""
        if self._txn is None or not self._txn[0].done():
            return []
        future, batch, points = self._txn
        self._txn = None
        try:
            future.result()
        except TransactionFailed as e:
            log.error("transaction aborted (%s); its records will be consumed again", e)
            self._rewind(set(points))
            return []
        self.tracker.mark_committed(points)
        return batch

    def wait(self, timeout: float) -> None:
        if self._txn is None and (not self._points or time.monotonic() < self._retry_at):
            time.sleep(timeout)  # nothing to begin a transaction with yet
        else:
            self._wait(timeout)  # the one in flight; without one, the loop's next pass begins one at once

    def _wait(self, timeout: float = TXN_WAIT_S) -> None:
        if self._txn is not None:
            wait([self._txn[0]], timeout=timeout)

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
        self._drop(partitions)
        self.tracker.forget(partitions)
        self._retry_at = time.monotonic() + self.retry_after_s

    def _drop(self, partitions: set[TopicPartition]) -> None:
        """Responses released for these partitions, not yet in a transaction, are redone from their commit point."""
        self._released = [m for m in self._released if _tp(m) not in partitions]
        self._points = {tp: p for tp, p in self._points.items() if tp not in partitions}

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        # Nothing is committed from here: what is unanswered is redone by the new owner. Should a
        # partition come straight back, it starts where the transaction in flight leaves it, so that
        # wait is the one wait here (KIP-447 fences it should the new generation come first).
        if self._txn is not None and set(self._txn[2]) & partitions:
            self._wait()
            future, _, points = self._txn
            if future.done() and future.exception() is None:
                self.tracker.mark_committed(points)
        restart = self.tracker.restart_points(partitions)
        self._drop(partitions)
        self._forget(partitions)
        return restart

    def drain(self) -> list[Message]:
        delivered: list[Message] = []
        for _ in range(2):  # the transaction in flight, then one for what was released meanwhile
            self._wait()
            delivered += self._send([])
        return delivered

    def close(self) -> None:
        self._committer.shutdown(wait=True)
        super().close()


DELIVERY_MODES = {"at-least-once": AtLeastOnce, "exactly-once": ExactlyOnce}


def make_delivery(mode: str, producer: Callable[[bool], Producer], responses: str, deadletters: str) -> Delivery:
    """The strategy for `mode`, over a producer made by `producer(transactional)`."""
    if mode not in DELIVERY_MODES:
        raise ConfigError(f"delivery {mode!r} is not one of {', '.join(DELIVERY_MODES)}")
    if mode == "exactly-once":
        return ExactlyOnce(TransactionalSink(producer(True), responses, deadletters))
    return AtLeastOnce(ResponseSink(producer(False), responses, deadletters))
