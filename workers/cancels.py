"""The experiment's cancel topic, read by every worker of the experiment in a thread of its own.

No consumer group: each worker reads every cancel (the request may be with any of them), from the
topic's end when it starts (a cancel sent before a worker started is for a request some other worker
had, or one still in Kafka that this worker will meet later, which is why the middleware remembers
cancels it could not match yet)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import TopicPartition
from pydantic import ValidationError

from abqueue.kafka import KafkaSettings, consumer
from schemas.stream import Cancel, decode_cancel

log = logging.getLogger(__name__)


class CancelReader:
    def __init__(self, settings: KafkaSettings, topic: str, on_cancel: Callable[[Cancel], None]):
        self._consumer = consumer(settings, group_id=None, enable_auto_commit=False)
        partitions = self._consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_end(*tps)
        for tp in tps:
            self._consumer.position(tp)  # resolved now: a cancel sent after start-up is never skipped
        self._on_cancel = on_cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abq-cancels", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
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
        self._consumer.close()
