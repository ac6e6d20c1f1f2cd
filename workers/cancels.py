"""The experiment's cancel topic, read by every worker of the experiment in a thread of its own.

No consumer group: each worker reads every cancel (the request may be with any of them), from an
hour back when it starts reading (a cancel sent before a worker started may be for a request still in
Kafka that this worker will meet later, which is why the middleware remembers cancels it could not
match yet, for as long)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.errors import UnknownTopicOrPartitionError
from pydantic import ValidationError

from abqueue.kafka import KafkaSettings, consumer
from schemas.stream import Cancel, decode_cancel
from workers.middleware.cancelling import REMEMBER_S

log = logging.getLogger(__name__)

RETRY_S = 30.0


class CancelReader:
    def __init__(self, settings: KafkaSettings, topic: str, on_cancel: Callable[[Cancel], None]):
        self._settings, self.topic, self._on_cancel = settings, topic, on_cancel
        self._consumer: Any = None
        self._ends: dict[TopicPartition, int] = {}  # the topic's end when reading began
        self._stop = threading.Event()
        # Set once every cancel sent before reading began was handed to on_cancel, or reading
        # could not begin (no topic, no Read on it: nothing to wait for); the worker's first batch
        # waits for it.
        self.caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abq-cancels", daemon=True)
        self._thread.start()

    def _start(self) -> bool:
        """Reads from the topic's end from now on; False (said in one line) where it cannot yet: a
        topic not created yet, or a user without Read on it (KafkaUsers rendered before cancels
        existed). The worker serves either way; it acts on cancels once it can read them."""
        try:
            c = consumer(self._settings, group_id=None, enable_auto_commit=False)
        except Exception as e:
            log.warning(
                "cannot read cancels from %s (%s: %s); retrying in %gs", self.topic, type(e).__name__, e, RETRY_S
            )
            return False
        try:
            partitions = c.partitions_for_topic(self.topic)
            if not partitions:
                raise UnknownTopicOrPartitionError(self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            c.assign(tps)
            # From REMEMBER_S ago: a cancel sent while no worker ran (or while this one started) is for
            # a request that may still wait in Kafka for this worker.
            since = c.offsets_for_times({tp: int((time.time() - REMEMBER_S) * 1000) for tp in tps})
            self._ends = c.end_offsets(tps)
            c.seek_to_end(*tps)
            for tp in tps:
                if since.get(tp) is not None:
                    c.seek(tp, since[tp].offset)
                c.position(tp)
        except Exception as e:
            c.close()
            log.warning(
                "cannot read cancels from %s (%s); requests are not cancelled until it can: create the experiment's "
                "topics (abq experiment apply --create-topics) and give the worker's user Read on it (abq deploy "
                "render); retrying in %gs", self.topic, type(e).__name__, RETRY_S,
            )  # fmt: skip
            return False
        self._consumer = c
        return True

    def _run(self) -> None:
        while not self._start():
            self.caught_up.set()
            if self._stop.wait(RETRY_S):
                return
        while not self._stop.is_set():
            try:
                # Before the next poll: what the last one returned has been handed on.
                if not self.caught_up.is_set() and all(
                    self._consumer.position(tp) >= e for tp, e in self._ends.items()
                ):
                    self.caught_up.set()
                polled = self._consumer.poll(timeout_ms=200)
            except Exception:  # a broker outage: cancels wait in Kafka until it passes
                log.warning("could not read the cancel topic; trying again", exc_info=True)
                self._stop.wait(1.0)
                continue
            for records in polled.values():
                for r in records:
                    try:
                        cancel = decode_cancel(r.value or b"")
                    except (ValidationError, ValueError) as e:
                        log.warning("skipping an undecodable cancel at offset %d: %s", r.offset, e)
                        continue
                    try:
                        self._on_cancel(cancel)
                    except Exception:
                        log.exception("cancelling request %s failed", cancel.request_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._consumer is not None:
            self._consumer.close()
