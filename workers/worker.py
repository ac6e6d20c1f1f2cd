"""The worker loop: poll what there is room for, let middleware decide what must not run, hand the
rest to the engine, publish each outcome as the engine finishes it, and commit per partition only up
to the lowest offset whose response is safe in Kafka.

The loop never waits on the engine; the runner (continuous or static batching) works in the
background and the loop collects what it finished. Backpressure is by pausing partitions: at most
`max_inflight` requests are with the engine and each priority level buffers at most as many more.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import CommitFailedError, KafkaError, RetriableError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from kafkaio import KafkaSettings, consumer, ensure_topics, release_parked_records
from workers.admission import Admission
from workers.backoff import retrying
from workers.engine import Engine
from workers.message import Message
from workers.middleware import Middleware, default_middleware
from workers.offsets import OffsetTracker
from workers.runners import BatchRunner, StreamRunner
from workers.sink import PublishFailed, ResponseSink, TransactionFailed, TransactionalSink

log = logging.getLogger(__name__)

IDLE_POLL_MS = 1000
BUSY_WAIT_S = 0.005  # how long the loop waits for the engine before polling Kafka again
FETCH_MAX_WAIT_MS = 100
DELIVERY_MODES = ("at-least-once", "exactly-once")


def _tp(m: Message) -> TopicPartition:
    return TopicPartition(m.record.topic, m.record.partition)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned):
        self.worker._on_assigned(set(assigned))


class Worker:
    def __init__(self, settings: KafkaSettings, experiment, variant: str, engine: Engine,
                 max_batch: int = 32, max_wait_ms: int = 50, max_inflight: int | None = None,
                 delivery: str = "at-least-once", low_priority_share: float = 0.1,
                 middleware: list[Middleware] | None = None, worker_id: str | None = None,
                 max_poll_interval_ms: int = 300_000, session_timeout_ms: int = 10_000,
                 create_topics: bool = True, drain_timeout_s: float = 120.0,
                 engine_attempts: int = 3, follow=None):
        """follow: a ConfigFollower; the variant's limits (max_prompt_chars, max_tokens_limit) then
        come from the live config as it changes. Engine settings need a restart (a rolling update)."""
        if delivery not in DELIVERY_MODES:
            raise ValueError(f"delivery {delivery!r} is not one of {', '.join(DELIVERY_MODES)}")
        self.experiment = experiment
        self.variant = experiment.variant(variant)
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        # Static batching keeps the next batch filling while one runs; continuous fills the engine.
        self.max_inflight = max_inflight or (2 * max_batch if engine.batching == "static" else 64)
        self.delivery = delivery
        self.engine_attempts = engine_attempts
        self.drain_timeout_s = drain_timeout_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.middleware = middleware if middleware is not None else default_middleware()
        self.registry = CollectorRegistry()
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._started = False
        self.startup_seconds: float | None = None
        self.batches = 0
        if create_topics:
            ensure_topics(settings, experiment)
        self.topics = experiment.request_topics(self.variant.name)
        self.group = experiment.consumer_group(self.variant.name)
        self.consumer = consumer(
            settings, group_id=self.group, client_id=f"{settings.client_id}-{self.worker_id}",
            max_poll_records=max_batch, max_poll_interval_ms=max_poll_interval_ms,
            # A worker killed without leaving the group holds its partitions this long: short, so a
            # replacement picks them up quickly (kafka-python's default is 45 s).
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=max(1000, session_timeout_ms // 4),
            # kafka-python sometimes has a fetch parked at the broker for partitions other than the
            # one a new record lands on; a short park bounds that wait (500 ms by default).
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            # Requests published inside another pipeline's transaction count only once committed.
            isolation_level="read_committed",
            # Range splits each priority topic among the workers on its own; cooperative-sticky
            # balances the partition count over all topics and can leave a worker with only empty
            # priority levels (seen in tests), which costs more than the work an eager move drops.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self.consumer.subscribe(list(self.topics.values()), listener=_Rebalance(self))
        # A shadow variant's answers are recorded apart, where no caller listens.
        responses = experiment.shadow_response_topic if self.variant.shadow_of else experiment.response_topic
        if delivery == "exactly-once":
            self.sink: ResponseSink = TransactionalSink(
                settings, responses, experiment.deadletter_topic, transactional_id=f"{self.group}.{self.worker_id}")
        else:
            self.sink = ResponseSink(settings, responses, experiment.deadletter_topic)
        self.tracker = OffsetTracker()
        self.admission = Admission(self.topics, capacity=self.max_inflight, low_share=low_priority_share)
        self.runner = None
        self._decided: list[Message] = []  # answered or dead-lettered without the engine
        self._restart: dict[TopicPartition, int] = {}
        self._unpublished: list[Message] = []
        self._retry_at = 0.0
        if follow is not None:
            follow.on_change(self._config_changed)
            if (live := follow.get(experiment.name)) is not None:
                self._config_changed(live)

    def _config_changed(self, record) -> None:
        new = record.experiment
        if new.name != self.experiment.name or new == self.experiment:
            return
        if self.variant.name not in {v.name for v in new.variants}:
            log.warning("experiment %s v%d no longer has variant %s; serving what is left in its topics",
                        new.name, record.version, self.variant.name)
            return
        fresh = new.variant(self.variant.name)
        keep = {"weight", "max_prompt_chars", "max_tokens_limit", "scaling", "deploy", "price"}
        if fresh.model_dump(exclude=keep) != self.variant.model_dump(exclude=keep):
            log.warning("experiment %s v%d changes %s's engine settings; they apply when the worker restarts",
                        new.name, record.version, self.variant.name)
        self.experiment, self.variant = new, fresh
        log.info("experiment %s v%d in use (limits: %d prompt chars, %d max_tokens)", new.name, record.version,
                 fresh.max_prompt_chars, fresh.max_tokens_limit)

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def alive(self) -> tuple[bool, str]:
        if not self._started:  # warming up can take minutes; the startup probe bounds it, not this
            return True, "starting: engine warming up\n"
        # A loop that has not come round for longer than a poll interval is stuck (max.poll.interval).
        age = time.monotonic() - self._heartbeat
        limit = self.consumer.config["max_poll_interval_ms"] / 1000
        return (age < limit, f"loop last ran {age:.1f}s ago (limit {limit:.0f}s)\n")

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining\n"
        return (self._started, "ready\n" if self._started else "starting: engine loading or warming up\n")

    @property
    def inflight(self) -> int:
        return self.runner.inflight if self.runner else 0

    def _make_runner(self):
        if self.engine.batching == "continuous":
            return StreamRunner(self.engine, attempts=self.engine_attempts)
        call = self.engine.generate
        for mw in reversed(self.middleware):  # the first middleware ends up outermost
            call = mw.wrap_engine(self, call)
        return BatchRunner(call, self.max_batch, self.max_wait_ms)

    def run(self) -> None:
        for mw in self.middleware:
            mw.on_start(self)
        self.runner = self._make_runner()
        # No traffic meets a cold engine: readiness waits for one answered request.
        warm_up = getattr(self.engine, "warm_up", None)
        if callable(warm_up):
            warm_up()
        self.startup_seconds = time.time() - process_start_time()
        self._started = True
        log.info("worker %s serving %s (group %s, engine %s, %s batching, %s, max %d in flight); ready after %.1fs",
                 self.worker_id, ", ".join(self.topics.values()), self.group, self.engine.model,
                 self.engine.batching, self.delivery, self.max_inflight, self.startup_seconds)
        try:
            drain_until = None
            while True:
                self._heartbeat = time.monotonic()
                if self.stopping:
                    drain_until = drain_until or time.monotonic() + self.drain_timeout_s
                    if not self.inflight or time.monotonic() > drain_until:
                        self._deliver(self.runner.take(0))
                        if self.delivery == "at-least-once":
                            self.tracker.release()
                            self.commit(self.tracker.points(), sync=True)
                        break
                    self._deliver(self.runner.take(0.05))
                    continue
                self._admit()
                busy = self.inflight or len(self.admission)
                self._deliver(self.runner.take(BUSY_WAIT_S if busy else 0))
        finally:
            for mw in self.middleware:
                mw.on_stop(self)
            self.close()

    def close(self) -> None:
        if self.runner:
            self.runner.close()
        self.sink.close()
        self.consumer.close(autocommit=False)  # leaves the group now, so a rebalance starts at once
        self.engine.close()
        log.info("worker %s stopped after %d deliveries", self.worker_id, self.batches)

    # -- in: poll and admit ----------------------------------------------------------------------
    def _admit(self) -> None:
        self.admission.apply_pauses(self.consumer)
        release_parked_records(self.consumer)
        idle = not (self.inflight or len(self.admission) or self._decided or self._unpublished)
        polled = self.consumer.poll(timeout_ms=IDLE_POLL_MS if idle else 0, max_records=self.max_batch)
        now = time.time()  # when the worker got the record
        fresh = [Message(r, dequeued_at=now) for recs in polled.values() for r in recs]
        for m in fresh:
            self.tracker.add(_tp(m), m.record.offset)
        self.admission.add(fresh)
        room = self.max_inflight - self.inflight
        if room <= 0 or not len(self.admission):
            return
        chosen = self.admission.pick(room)
        for mw in self.middleware:
            mw.before_batch(self, chosen)
        self._decided += [m for m in chosen if m.done]
        todo = [m for m in chosen if not m.done]
        log.debug("admitted %d requests (%d decided without the engine)", len(chosen), len(chosen) - len(todo))
        if todo:
            self.runner.submit(todo)

    # -- out: publish and commit -----------------------------------------------------------------
    def _deliver(self, finished: list[Message]) -> None:
        for m in finished:
            m.answer_completion(variant=self.variant.name, model=self.engine.model, worker_id=self.worker_id)
        ready = self._unpublished + self._decided + finished
        self._unpublished, self._decided = [], []
        # A revoked partition's records belong to their new owner, which will answer them itself.
        ready = [m for m in ready if self.tracker.owns(_tp(m), m.record.offset)]
        if not ready:
            return
        if time.monotonic() < self._retry_at:
            self._unpublished = ready
            return
        if self.delivery == "exactly-once":
            self._deliver_transaction(ready)
        else:
            self._deliver_then_commit(ready)

    def _deliver_then_commit(self, ready: list[Message]) -> None:
        try:
            self.sink.publish(ready)
        except PublishFailed as e:
            # Nothing is committed past these records; keep them and publish again shortly.
            log.error("could not publish %d responses (%s); retrying in 1s", len(ready), e)
            self._unpublished, self._retry_at = ready, time.monotonic() + 1.0
            return
        for m in ready:
            self.tracker.answer(_tp(m), m.record.offset)
        _, offsets = self.tracker.release()
        self.commit(offsets)
        self._after(ready)

    def _deliver_transaction(self, ready: list[Message]) -> None:
        for m in ready:
            self.tracker.answer(_tp(m), m.record.offset, m)
        # Only responses below the commit point go out: each transaction's offsets cover exactly them.
        released, offsets = self.tracker.release()
        if not offsets:
            return
        try:
            self.sink.publish_with_offsets(released, self._offsets(offsets), self.consumer.group_metadata())
        except TransactionFailed as e:
            log.error("transaction aborted (%s); its records will be consumed again", e)
            self._rewind(set(offsets))
            return
        self.tracker.mark_committed(offsets)
        self._after(released)

    def _after(self, delivered: list[Message]) -> None:
        self.batches += 1
        for mw in self.middleware:
            mw.after_batch(self, delivered)

    @staticmethod
    def _offsets(points: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: OffsetAndMetadata(off, "", -1) for tp, off in points.items()}

    def commit(self, points: dict[TopicPartition, int], sync: bool = False) -> None:
        """Commit points whose responses are safe. Asynchronous on the hot path: a commit that fails
        is sent again with the next one, and a crash before it lands only means redoing those records;
        synchronous where the partitions are about to change hands."""
        if not points:
            return
        if not sync:
            def landed(offsets, result):
                if isinstance(result, Exception):
                    log.warning("commit failed (%s); it is sent again with the next one", result)
                    self.tracker.commit_failed(offsets)

            self.tracker.mark_committed(points)
            self.consumer.commit_async(self._offsets(points), callback=landed)
            return
        try:
            retrying("commit", RetriableError, attempts=5)(self.consumer.commit, self._offsets(points))
            self.tracker.mark_committed(points)
        except CommitFailedError as e:
            # The group rebalanced under us: another member owns these partitions now and will
            # consume from the last commit. Responses already published are the duplicate window.
            log.warning("commit refused after a rebalance (%s); the new owner will redo these records", e)
        except KafkaError as e:
            log.error("commit failed (%s); the next commit covers these records", e)

    def _rewind(self, partitions: set[TopicPartition]) -> None:
        """Start these partitions again from their last commit: buffered and in-flight work is dropped."""
        self.admission.drop(partitions)
        for tp, point in self.tracker.restart_points(partitions).items():
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, point)
        self.tracker.forget(partitions)
        self._retry_at = time.monotonic() + 1.0

    # -- rebalances ------------------------------------------------------------------------------
    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let revoked partitions go. kafka-python runs this on its IO thread, where nothing may block:
        the commit point goes out asynchronously, work still buffered or with the engine is dropped
        (its new owner redoes it), and no response for these partitions is published from here on."""
        if not revoked:
            return
        self.admission.drop(revoked)
        self.tracker.release()
        points = self.tracker.points(revoked) if self.delivery == "at-least-once" else {}
        # Where to start again should a partition come straight back: kafka-python keeps a retained
        # partition's position (past the dropped records) and its paused flag across the rebalance.
        self._restart = points or self.tracker.restart_points(revoked)
        left = self.tracker.unanswered(revoked)
        self.tracker.forget(revoked)
        if points:
            try:
                self.consumer.commit_async(self._offsets(points))
            except KafkaError as e:
                log.warning("could not commit revoked partitions (%s); their new owner redoes from the last commit", e)
        log.info("partitions revoked: %d; %d unanswered requests left to their next owner", len(revoked), left)


    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned & set(self._restart):
            self.consumer.seek(tp, self._restart[tp])
        if assigned:
            self.consumer.resume(*assigned)  # nothing of them is buffered here any more
        self._restart = {}
        log.info("assigned %d partitions", len(assigned))


def process_start_time() -> float:
    """Unix time this process started (Linux), so start-up time includes imports and model loading."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()
