"""The worker loop: poll a batch, let middleware decide what must not run, run the rest through the
engine, publish every outcome, and commit offsets only once Kafka has acknowledged them all."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RetriableError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from kafkaio import KafkaSettings, consumer, ensure_topics
from schemas import ExperimentConfig, Usage
from workers.backoff import retrying
from workers.engine import Engine
from workers.message import Message
from workers.middleware import Middleware, default_middleware
from workers.sink import PublishFailed, ResponseSink

log = logging.getLogger(__name__)

IDLE_POLL_MS = 1000
FETCH_MAX_WAIT_MS = 100


class Worker:
    def __init__(self, settings: KafkaSettings, experiment: ExperimentConfig, variant: str, engine: Engine,
                 max_batch: int = 32, max_wait_ms: int = 50, middleware: list[Middleware] | None = None,
                 worker_id: str | None = None, max_poll_interval_ms: int = 300_000, session_timeout_ms: int = 10_000,
                 create_topics: bool = True):
        self.experiment = experiment
        self.variant = experiment.variant(variant)
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.middleware = middleware if middleware is not None else default_middleware()
        self.registry = CollectorRegistry()
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._started = False
        self.batches = 0
        if create_topics:
            ensure_topics(settings, experiment)
        self.topic = experiment.request_topic(self.variant.name)
        self.consumer = consumer(
            settings, self.topic, group_id=experiment.consumer_group(self.variant.name),
            client_id=f"{settings.client_id}-{self.worker_id}", max_poll_records=max_batch,
            max_poll_interval_ms=max_poll_interval_ms,
            # A worker killed without leaving the group holds its partitions this long: short, so a
            # replacement picks them up quickly (kafka-python's default is 45 s).
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=max(1000, session_timeout_ms // 4),
            # kafka-python sometimes has a fetch parked at the broker for partitions other than the
            # one a new record lands on; a short park bounds that wait (500 ms by default).
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self.sink = ResponseSink(settings, experiment.response_topic, experiment.deadletter_topic)
        self._engine_call = self.engine.generate

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def alive(self) -> tuple[bool, str]:
        # A loop that has not come round for longer than a poll interval is stuck (max.poll.interval).
        age = time.monotonic() - self._heartbeat
        limit = self.consumer.config["max_poll_interval_ms"] / 1000
        return (age < limit, f"loop last ran {age:.1f}s ago (limit {limit:.0f}s)\n")

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining\n"
        return (self._started, "ready\n" if self._started else "starting\n")

    def run(self) -> None:
        for mw in self.middleware:
            mw.on_start(self)
        call = self.engine.generate
        for mw in reversed(self.middleware):  # the first middleware ends up outermost
            call = mw.wrap_engine(self, call)
        self._engine_call = call
        self._started = True
        log.info("worker %s serving %s (group %s, engine %s)", self.worker_id, self.topic,
                 self.experiment.consumer_group(self.variant.name), self.engine.model)
        try:
            while not self.stopping:
                self._heartbeat = time.monotonic()
                batch = self.fetch()
                if batch:
                    self.process(batch)
        finally:
            for mw in self.middleware:
                mw.on_stop(self)
            self.close()

    def close(self) -> None:
        self.sink.close()
        self.consumer.close(autocommit=False)  # leaves the group now, so a rebalance starts at once
        self.engine.close()
        log.info("worker %s stopped after %d batches", self.worker_id, self.batches)

    # -- one batch -------------------------------------------------------------------------------
    def fetch(self) -> list[Message]:
        """Up to max_batch records; waits at most max_wait_ms after the first one for more."""
        batch: list[Message] = []

        def take(polled) -> None:
            now = time.time()  # when the worker got the record; waiting for the batch to fill is its own cost
            batch.extend(Message(r, dequeued_at=now) for recs in polled.values() for r in recs)

        take(self.consumer.poll(timeout_ms=IDLE_POLL_MS, max_records=self.max_batch))
        if not batch:
            return batch
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while len(batch) < self.max_batch and not self.stopping:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            take(self.consumer.poll(timeout_ms=left_ms, max_records=self.max_batch - len(batch)))
        return batch

    def process(self, batch: list[Message]) -> None:
        for mw in self.middleware:
            mw.before_batch(self, batch)
        todo = [m for m in batch if not m.done]
        log.debug("engine: batch of %d (%d decided before the engine)", len(todo), len(batch) - len(todo))
        if todo:
            started = time.time()
            completions = self._engine_call([m.request for m in todo])
            for m, c in zip(todo, completions, strict=True):  # Retries checks the count
                m.answer(
                    variant=self.variant.name, model=self.engine.model, worker_id=self.worker_id,
                    outputs=c.outputs, finish_reason=c.finish_reason, error=c.error, started=started,
                    first_token=c.first_token_at,
                    usage=Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
                )
        try:
            self.sink.publish(batch)
        except PublishFailed as e:
            # Nothing of this batch is committed: rewind so the records are consumed again.
            log.error("could not publish a batch of %d (%s); it will be consumed again", len(batch), e)
            self._rewind(batch)
            return
        self.commit(batch)
        self.batches += 1
        for mw in self.middleware:
            mw.after_batch(self, batch)

    @staticmethod
    def _offset_ranges(batch: list[Message]) -> dict[TopicPartition, tuple[int, int]]:
        """Per partition, the batch's first and last offset."""
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for m in batch:
            tp, off = TopicPartition(m.record.topic, m.record.partition), m.record.offset
            first, last = ranges.get(tp, (off, off))
            ranges[tp] = (min(first, off), max(last, off))
        return ranges

    def commit(self, batch: list[Message]) -> None:
        offsets = {tp: OffsetAndMetadata(last + 1, "", -1) for tp, (_, last) in self._offset_ranges(batch).items()}
        try:
            retrying("commit", RetriableError, attempts=5)(self.consumer.commit, offsets)
        except CommitFailedError as e:
            # The group rebalanced under us: another member owns these partitions now and will
            # consume from the last commit. Responses already published are the duplicate window.
            log.warning("commit refused after a rebalance (%s); the new owner will redo this batch", e)
        except KafkaError as e:
            log.error("commit failed (%s); the batch will be consumed again after a restart or rebalance", e)

    def _rewind(self, batch: list[Message]) -> None:
        for tp, (first, _) in self._offset_ranges(batch).items():
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, first)
        time.sleep(1.0)
