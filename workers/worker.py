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

from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from abqueue.errors import AbqError
from abqueue.kafka import KafkaSettings, ensure_topics
from schemas import ExperimentConfig
from workers.admission import Admission
from workers.cancels import CancelReader
from workers.delivery import Delivery, make_delivery
from workers.engines.base import Engine
from workers.inflight import InflightLimit
from workers.membership import STRANDED_AFTER_S, MembershipWatch
from workers.message import Message
from workers.middleware import Middleware, default_middleware, emit_after, emit_before, wrap_engine
from workers.middleware.cancelling import Cancelling
from workers.middleware.hooks import Hooks
from workers.middleware.streaming import Streaming
from workers.runners import Runner, engine_call, make_runner
from workers.streams import StreamPublisher
from workers.transport import Consumer, Offsets

log = logging.getLogger(__name__)


class EngineDied(AbqError):
    """The engine died: the worker stopped without answering what it still had."""


# What a live config change applies at once (read per request); the rest needs a restart (the engine,
# its adapters and templates, the hooks, the topics and group are made at start).
LIVE_FIELDS = {"weight", "max_prompt_chars", "max_tokens_limit", "max_top_logprobs", "system_prompt", "sampling",
               "scaling", "deploy", "price", "shadow_percent"}  # fmt: skip
IDLE_POLL_MS = 1000
ACK_POLL_MS = 20  # while only acknowledgements or a transaction are awaited (a new request ends the wait)
# The bound on requests with a continuous engine when --max-inflight is not given: it bounds memory
# (each priority level buffers as many); within it the limit follows the engine (workers/inflight.py).
DEFAULT_MAX_INFLIGHT = 512
BUSY_WAIT_S = 0.005  # how long the loop waits for the engine before polling Kafka again
# Records per poll by default (at least --max-batch). A loop pass has costs that do not grow with its
# records (a poll's hand-offs to kafka-python's IO thread, a commit): an echo worker draining a backlog
# spent 13% less CPU per request and drained 20% faster polling up to 128 than up to 32. Admission
# bounds what is buffered however many a poll may return.
POLL_RECORDS = 128


def records_per_poll(max_batch: int, asked: int | None = None) -> int:
    return asked or max(max_batch, POLL_RECORDS)


class Worker:
    def __init__(
        self,
        experiment: ExperimentConfig,
        variant: str,
        engine: Engine,
        consumer: Consumer,
        delivery: Delivery,
        max_batch: int = 32,
        max_wait_ms: int = 50,
        max_inflight: int | None = None,
        poll_records: int | None = None,
        low_priority_share: float = 0.1,
        middleware: list[Middleware] | None = None,
        worker_id: str | None = None,
        drain_timeout_s: float = 120.0,
        follow=None,
        stranded_after_s: float = STRANDED_AFTER_S,
        streams: StreamPublisher | None = None,
        cancels=None,
    ):
        """Serves one variant, or a pool of variants on one engine (`variant` names either), through
        `consumer` and `delivery`; does no I/O until run().
        `Worker.from_settings` builds both on Kafka. follow: a ConfigFollower; the variant's limits
        (max_prompt_chars, max_tokens_limit) then come from the live config as it changes. Engine
        settings need a restart (a rolling update). streams: where streamed requests' chunks are
        published (Worker.from_settings makes one); without it a streamed request is answered whole.
        cancels(on_cancel): starts reading the experiment's cancel topic (workers.cancels.CancelReader)."""
        self.experiment = experiment
        served = experiment.serving(variant)
        self.serves = served[0].pool or served[0].name  # a pool's name, or the one variant's
        self.variants = {v.name: v for v in served}
        self.variant = served[0]  # the one whose engine settings the pool shares
        self.engine = engine
        self.consumer = consumer
        self.delivery = delivery
        self.max_batch = max_batch
        self.poll_records = records_per_poll(max_batch, poll_records)
        self.max_wait_ms = max_wait_ms
        # Static batching keeps the next batch filling while one runs. A continuous engine is handed
        # what it can run plus a little (workers/inflight.py), at most max_inflight.
        self.max_inflight = max_inflight or (2 * max_batch if engine.batching == "static" else DEFAULT_MAX_INFLIGHT)
        self.limit = InflightLimit(self.max_inflight) if engine.batching == "continuous" else None
        self.completed = 0  # requests the engine has finished
        self.drain_timeout_s = drain_timeout_s
        self.worker_id = worker_id or default_worker_id()
        self.middleware = middleware if middleware is not None else default_middleware()
        hooks = {v.name: v.hooks for v in served if v.hooks is not None}
        if hooks and not any(isinstance(m, Hooks) for m in self.middleware):
            self.middleware = [*self.middleware, Hooks(hooks)]  # innermost: on the requests that reach the engine
        if streams is not None and not any(isinstance(m, Streaming) for m in self.middleware):
            # Last: its before_batch sees only what validation and deadlines let through.
            self.middleware = [*self.middleware, Streaming(streams)]
        if not any(isinstance(m, Cancelling) for m in self.middleware):
            # Innermost around the engine: it aborts the request the engine was given (a hook's, if any).
            self.middleware = [*self.middleware, Cancelling(cancels)]
        self.registry = CollectorRegistry()
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._started = False
        self.startup_seconds: float | None = None
        self.batches = 0
        by_level = [experiment.request_topics(v.name) for v in served]
        self.topics = {lvl: [t[lvl] for t in by_level] for lvl in by_level[0]}
        self._variant_of = {topic: v.name for v, t in zip(served, by_level, strict=True) for topic in t.values()}
        self.group = experiment.consumer_group(self.serves)
        self.admission = Admission(self.topics, capacity=self.max_inflight, low_share=low_priority_share)
        self.delivery.bind(consumer, self.admission.drop)
        self.membership = MembershipWatch(consumer, self.group, stranded_after_s)
        self.runner: Runner | None = None
        self._decided: list[Message] = []  # answered or dead-lettered without the engine
        self._restart: Offsets = {}
        self._engine_dead: Exception | None = None
        if follow is not None:
            follow.watch(experiment, self._config_changed)

    @classmethod
    def from_settings(
        cls,
        settings: KafkaSettings,
        experiment: ExperimentConfig,
        variant: str,
        engine: Engine,
        *,
        delivery: str = "at-least-once",
        create_topics: bool = True,
        max_batch: int = 32,
        poll_records: int | None = None,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        worker_id: str | None = None,
        **options,
    ) -> Worker:
        """A worker on Kafka: creates the experiment's topics (unless told not to), joins the
        variant's consumer group and picks the delivery strategy."""
        from workers.transport.kafka import KafkaConsumerTransport, KafkaProducerTransport

        if create_topics:
            ensure_topics(settings, experiment)
        v = experiment.serving(variant)[0]
        worker_id = worker_id or default_worker_id()
        group = experiment.consumer_group(variant)
        consumer = KafkaConsumerTransport(
            settings,
            group,
            client_id=f"{settings.client_id}-{worker_id}",
            max_poll_records=records_per_poll(max_batch, poll_records),
            max_poll_interval_ms=max_poll_interval_ms,
            session_timeout_ms=session_timeout_ms,
        )
        # A shadow variant's answers are recorded apart, where no caller listens.
        responses = experiment.shadow_response_topic if v.shadow_of else experiment.response_topic
        topics = [responses, experiment.deadletter_topic]

        def producer(transactional: bool) -> KafkaProducerTransport:
            if not transactional:
                return KafkaProducerTransport(settings, topics)
            return KafkaProducerTransport(
                settings, topics, transactional_id=f"{group}.{worker_id}", transaction_timeout_ms=60_000
            )

        strategy = make_delivery(delivery, producer, *topics)
        if "streams" not in options:
            options["streams"] = StreamPublisher(KafkaProducerTransport(settings, [responses]), worker_id)
        if "cancels" not in options:
            options["cancels"] = lambda on_cancel: CancelReader(settings, experiment.cancel_topic, on_cancel)
        return cls(
            experiment,
            variant,
            engine,
            consumer,
            strategy,
            max_batch=max_batch,
            poll_records=poll_records,
            worker_id=worker_id,
            **options,
        )

    def _config_changed(self, record) -> None:
        new = record.experiment
        known = {v.name for v in new.variants}
        if gone := sorted(set(self.variants) - known):
            log.warning("experiment %s v%d no longer has variant %s; serving what is left in its topics",
                        new.name, record.version, ", ".join(gone))  # fmt: skip
            return
        fresh = {name: new.variant(name) for name in self.variants}
        for name, v in fresh.items():
            old = self.variants[name]
            if later := sorted(
                f for f in type(v).model_fields if f not in LIVE_FIELDS and getattr(v, f) != getattr(old, f)
            ):
                log.warning("experiment %s v%d changes %s's %s; that applies when the worker restarts",
                            new.name, record.version, name, ", ".join(later))  # fmt: skip
        if added := sorted({v.name for v in new.pools().get(self.serves, [])} - set(self.variants)):
            log.warning("experiment %s v%d adds %s to pool %s; this worker serves it once restarted",
                        new.name, record.version, ", ".join(added), self.serves)  # fmt: skip
        self.experiment, self.variants, self.variant = new, fresh, fresh[self.variant.name]
        log.info("experiment %s v%d in use (limits: %s)", new.name, record.version, ", ".join(
            f"{v.name}: {v.max_prompt_chars} prompt chars, {v.max_tokens_limit} max_tokens" for v in fresh.values()
        ))  # fmt: skip

    def variant_of(self, m: Message):
        """The live config of the variant whose topic `m` came from."""
        return self.variants[m.variant]

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def alive(self) -> tuple[bool, str]:
        if self._engine_dead is not None:
            return False, f"the engine is dead: {self._engine_dead}\n"
        if not self._started:  # warming up can take minutes; the startup probe bounds it, not this
            return True, "starting: engine warming up\n"
        # A loop that has not come round for longer than a poll interval is stuck (max.poll.interval).
        age = time.monotonic() - self._heartbeat
        limit = self.consumer.max_poll_interval_s
        return (age < limit, f"loop last ran {age:.1f}s ago (limit {limit:.0f}s)\n")

    def ready(self) -> tuple[bool, str]:
        if self._engine_dead is not None:
            return False, f"the engine is dead: {self._engine_dead}\n"
        if self.stopping:
            return False, "draining\n"
        return (self._started, "ready\n" if self._started else "starting: engine loading or warming up\n")

    @property
    def inflight(self) -> int:
        return self.runner.inflight if self.runner else 0

    def run(self) -> None:
        emit_before(self.middleware, "before_start", self)
        call = wrap_engine(self.middleware, self, engine_call(self.engine))
        self.runner = runner = make_runner(self.engine, call, self.max_batch, self.max_wait_ms)
        self.consumer.subscribe(list(self._variant_of), self._on_revoked, self._on_assigned)
        # No traffic meets a cold engine: readiness waits for one answered request.
        self.engine.warm_up()
        self.startup_seconds = time.time() - process_start_time()
        self._started = True
        log.info(
            "worker %s serving %s (group %s, engine %s, %s batching, %s, max %d in flight); ready after %.1fs",
            self.worker_id,
            ", ".join(self._variant_of),
            self.group,
            self.engine.model,
            self.engine.batching,
            self.delivery.name,
            self.max_inflight,
            self.startup_seconds,
        )
        try:
            drain_until = None
            while True:
                self._heartbeat = time.monotonic()
                if self.stopping:
                    drain_until = drain_until or time.monotonic() + self.drain_timeout_s
                    self._stay_in_group()
                    if not self.inflight or time.monotonic() > drain_until:
                        self._deliver(runner.take(0))
                        self._delivered(self.delivery.drain())
                        break
                    self._deliver(runner.take(0.05))
                    continue
                self.membership.check(self._heartbeat)
                if self.limit is not None:
                    self.limit.loop(time.monotonic(), busy=self.inflight > 0)
                self._admit(runner)
                self._deliver(runner.take(BUSY_WAIT_S if self.inflight else 0))
        finally:
            emit_after(self.middleware, "after_stop", self)
            self.close()
        if self._engine_dead is not None:
            raise EngineDied(
                f"the engine died ({self._engine_dead}); the worker stopped so that it is restarted, and what "
                "it had not answered stays in Kafka for a healthy replica"
            ) from self._engine_dead

    def close(self) -> None:
        if self.runner:
            self.runner.close()
        self.delivery.close()
        self.consumer.close()
        self.engine.close()
        log.info("worker %s stopped after %d deliveries", self.worker_id, self.batches)

    def _stay_in_group(self) -> None:
        """While draining, poll with every partition paused: nothing new is fetched, but the worker
        still answers a rebalance, which would otherwise wait for it up to max.poll.interval.ms."""
        if assigned := self.consumer.assignment():
            self.consumer.pause(*assigned)
        self.consumer.poll(timeout_ms=0, max_records=1)

    # -- in: poll and admit ----------------------------------------------------------------------
    def _admit(self, runner: Runner) -> None:
        self.admission.apply_pauses(self.consumer)
        # Wait where the next event comes from: the engine (no wait here), Kafka's acknowledgements of
        # what was sent (a short wait: a new request is still taken at once), or new requests.
        idle, wait_ms = not self.inflight and not self._decided, 0
        if idle and not len(self.admission):
            wait_ms = ACK_POLL_MS if self.delivery.awaiting else IDLE_POLL_MS
        elif idle and self.delivery.unsent >= self.max_inflight:
            # Every slot holds an answer Kafka has not taken yet: nothing can be admitted until it does.
            # Polling without a wait meanwhile spun the loop, taking the CPU the broker needs.
            self.delivery.wait(BUSY_WAIT_S)
        # Never more than the emptiest-but-not-full level can take, so no level's buffer overflows;
        # with every level full all partitions are paused and the poll only keeps the group alive.
        max_records = max(1, min(self.poll_records, self.admission.room()))
        polled = self.consumer.poll(timeout_ms=wait_ms, max_records=max_records)
        now = time.time()  # when the worker got the records: after the poll, which may have waited for them
        fresh = [Message(r, dequeued_at=now, variant=self._variant_of[r.topic]) for r in polled]
        self.delivery.received(fresh)
        self.admission.add(fresh)
        room = self.max_inflight - self.inflight - self.delivery.unsent
        if self.limit is not None:
            stats = getattr(self.engine, "stats", dict)
            room = min(room, self.limit.update(stats, self.inflight, self.completed, time.monotonic()) - self.inflight)
        if room <= 0 or not len(self.admission):
            return
        chosen = self.admission.pick(room)
        emit_before(self.middleware, "before_batch", self, chosen)
        for m in chosen:
            if not m.done and m.request is None:  # a validating hook failed: never hand the engine nothing
                m.reject(
                    "unsupported",
                    "the worker could not prepare this request (a middleware failed; see its log)",
                    self,
                )
        self._decided += [m for m in chosen if m.done]
        todo = [m for m in chosen if not m.done]
        log.debug("admitted %d requests (%d decided without the engine)", len(chosen), len(chosen) - len(todo))
        if todo:
            runner.submit(todo)

    # -- out: publish and commit -----------------------------------------------------------------
    def _deliver(self, finished: list[Message]) -> None:
        if dead := [m for m in finished if m.engine_dead is not None]:
            if self._engine_dead is None:
                self._engine_dead = dead[0].engine_dead
                log.critical("the engine is dead (%s): no more requests are admitted, the worker stops and "
                             "leaves what it has not answered in Kafka", self._engine_dead)  # fmt: skip
                self.stop()
            finished = [m for m in finished if m.engine_dead is None]
        self.completed += len(finished)
        emit_before(self.middleware, "after_engine", self, finished)
        for m in finished:
            if not m.done and m.completion is not None and (refused := m.completion.refused) is not None:
                m.reject(refused.reason, refused.detail, self)  # a hook failed, or the engine refused what it made
            if not m.done:  # a middleware may have decided it
                m.answer_completion(model=self.engine.model, worker_id=self.worker_id)
        ready, self._decided = self._decided + finished, []
        emit_before(self.middleware, "before_deliver", self, ready)
        self._delivered(self.delivery.deliver(ready))

    def _delivered(self, safe: list[Message]) -> None:
        if safe:
            self.batches += 1
            emit_after(self.middleware, "after_batch", self, safe)

    # -- rebalances ------------------------------------------------------------------------------
    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let revoked partitions go. kafka-python runs this on its IO thread, where nothing may block:
        work still buffered or with the engine is dropped (its new owner redoes it), and no response
        for these partitions is published from here on."""
        if not revoked:
            return
        self.admission.drop(revoked)
        self._restart = self.delivery.revoked(revoked)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned & set(self._restart):
            self.consumer.seek(tp, self._restart[tp])
        if assigned:
            self.consumer.resume(*assigned)  # nothing of them is buffered here any more
        self._restart = {}
        # What it holds, not what this callback named: it logged "assigned 0 partitions" while serving three.
        log.info("holding %d partitions (%d newly assigned)", len(self.consumer.assignment()), len(assigned))


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


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
