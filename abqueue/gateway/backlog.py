"""Each variant's backlog (its consumer group's lag over its request topics), read in the
background so that a request never waits on Kafka's admin API, for load shedding: a variant whose
backlog is over the bound gets 429 with a Retry-After instead of a queue that grows without end."""

from __future__ import annotations

import logging
import math
import threading
import time

from kafka import TopicPartition

from abqueue.kafka import KafkaSettings, admin_client, consumer
from schemas import ExperimentConfig

log = logging.getLogger(__name__)


class Backlog:
    def __init__(self, settings: KafkaSettings, experiment: ExperimentConfig, bound: int, every_s: float = 1.0):
        self.experiment, self.bound, self.every_s = experiment, bound, every_s
        self._settings = settings
        self._lag: dict[str, int] = {}
        self._rate: dict[str, float] = {}  # requests served per second, from the committed offsets' progress
        self._served: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"backlog-{experiment.name}", daemon=True)
        self._thread.start()

    def retry_after(self, variant: str) -> int | None:
        """Seconds to wait before retrying where the variant's backlog is over the bound (enough
        for the workers to serve the excess at their recent rate, 1 to 60), else None."""
        lag = self._lag.get(variant, 0)
        if lag <= self.bound:
            return None
        rate = self._rate.get(variant, 0.0)
        return int(min(60, max(1, math.ceil((lag - self.bound) / rate)))) if rate > 0 else 10

    def lag(self, variant: str) -> int:
        return self._lag.get(variant, 0)

    def _run(self) -> None:
        admin = reader = None
        while not self._stop.is_set():
            try:
                if admin is None:
                    admin, reader = admin_client(self._settings), consumer(self._settings, group_id=None)
                self._read(admin, reader)
            except Exception as e:  # a broker away for a moment: keep the last reading, try again
                log.warning("could not read the backlog of %s (%s); keeping the last reading", self.experiment.name, e)
            self._stop.wait(self.every_s)
        for c in (admin, reader):
            if c is not None:
                c.close()

    def _read(self, admin, reader) -> None:
        now = time.monotonic()
        for v in self.experiment.variants:
            group = self.experiment.consumer_group(v.name)
            committed = {tp: om.offset for tp, om in admin.list_group_offsets(group).get(group, {}).items()}
            tps = [
                TopicPartition(topic, p)
                for topic in self.experiment.request_topics(v.name).values()
                for p in sorted(reader.partitions_for_topic(topic) or ())
            ]
            ends = reader.end_offsets(tps) if tps else {}
            starts = reader.beginning_offsets(tps) if tps else {}
            self._lag[v.name] = sum(ends[tp] - max(committed.get(tp, -1), starts[tp]) for tp in tps)
            served = sum(max(committed.get(tp, -1), starts[tp]) for tp in tps)
            then = self._served.get(v.name)
            if then is not None and now > then[0]:
                self._rate[v.name] = max(0.0, (served - then[1]) / (now - then[0]))
            self._served[v.name] = (now, served)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
