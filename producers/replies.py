"""ResponseListener: reads a responses topic from a known position and hands out responses by id."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kafka import TopicPartition
from kafka.errors import KafkaError
from pydantic import ValidationError

from abqueue.kafka import FetchPark, KafkaSettings, consumer, topics, tracing
from abqueue.kafka.clients import riding_out, transient
from schemas import ConfigError, InferenceResponse, decode_response
from schemas.stream import StreamPart, decode_part, is_part

log = logging.getLogger(__name__)


@dataclass
class Reply:
    response: InferenceResponse
    traceparent: str | None
    partition: int
    offset: int


class ResponseListener:
    """Assigns every partition of the topic (no consumer group: each caller reads for itself).

    Create it before publishing: its start position is taken at construction (the topic's end, or
    `start_offsets`), so no response that comes after can be missed.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        start_offsets: dict[int, int] | None = None,
        partitions_every_s: float = 10.0,
    ):
        """partitions_every_s: how often to look for partitions added to the topic since (a new
        partition is read from its beginning: all of it came after this listener started)."""
        self.topic = topic
        self.partitions_every_s = partitions_every_s
        self._looked_at = time.monotonic()
        # read_committed: an exactly-once worker's responses count once their transaction commits;
        # responses of at-least-once workers are not transactional and read as soon as they land.
        self._consumer = consumer(settings, group_id=None, enable_auto_commit=False, isolation_level="read_committed")
        self.park = FetchPark(self._consumer)  # a reply landing on a partition left out of a parked fetch waits less
        try:  # a broker of several just died: metadata and offsets come once the client moves off it
            partitions = riding_out(self._consumer.partitions_for_topic)(topic)
            if partitions:
                riding_out(self._start)(partitions, start_offsets)
        except BaseException:
            self._consumer.close()
            raise
        if not partitions:
            self._consumer.close()
            if not topics.visible(settings, topic):
                raise ConfigError(
                    f"not allowed to read {topic}: user {settings.sasl_username or '(no SASL user)'} has no ACL for it; "
                    "a producer reads only its own reply topics abq.EXPERIMENT.replies.CLIENT.* (docs/guides/kafka-security.md)"
                )
            raise ConfigError(
                f"topic {topic} does not exist; create it, or start a worker of the experiment, which creates its topics"
            )

    def _start(self, partitions: set[int], start_offsets: dict[int, int] | None) -> None:
        self._tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._tps)
        self._consumer.seek_to_end(*self._tps)
        for tp in self._tps:
            if start_offsets and tp.partition in start_offsets:
                self._consumer.seek(tp, start_offsets[tp.partition])
            self._consumer.position(tp)  # resolve now, so the start is before any later publish

    def positions(self) -> dict[int, int]:
        return {tp.partition: self._consumer.position(tp) for tp in self._tps}

    def end_offsets(self) -> dict[int, int]:
        return {tp.partition: off for tp, off in self._consumer.end_offsets(self._tps).items()}

    def _take_new_partitions(self) -> None:
        if time.monotonic() - self._looked_at < self.partitions_every_s:
            return
        self._looked_at = time.monotonic()
        try:
            self._consumer.topics()  # a metadata request: the cached metadata would not show new partitions
        except KafkaError as e:
            if not transient(e):
                raise
            # A broker back from a freeze may list no brokers for a moment: look again next time.
            log.info("could not look for partitions added to %s (%s); looking again later", self.topic, e)
            return
        known = {tp.partition for tp in self._tps}
        new = [TopicPartition(self.topic, p) for p in sorted(self._consumer.partitions_for_topic(self.topic) or ())
               if p not in known]  # fmt: skip
        if not new:
            return
        positions = {tp: self._consumer.position(tp) for tp in self._tps}
        self._tps += new
        self._consumer.assign(self._tps)  # replaces the assignment: positions are restored below
        for tp, pos in positions.items():
            self._consumer.seek(tp, pos)
        self._consumer.seek_to_beginning(*new)
        log.info("reading %d partitions added to %s", len(new), self.topic)

    def poll(self, timeout_ms: int = 200) -> Iterator[Reply | StreamPart]:
        """Whole responses, and the parts of streamed answers (on a reply topic that has them)."""
        self._take_new_partitions()
        polled = self._consumer.poll(timeout_ms=timeout_ms)
        self.park.polled(bool(polled))
        for records in polled.values():
            for r in records:
                try:
                    if is_part(r.headers):
                        yield decode_part(r.value)
                        continue
                    resp = decode_response(r.value)
                except (ValidationError, ValueError) as e:
                    log.warning("skipping undecodable record at %s/%d@%d: %s", r.topic, r.partition, r.offset, e)
                    continue
                yield Reply(resp, tracing.header_value(r.headers), r.partition, r.offset)

    def caught_up(self, ends: dict[int, int]) -> bool:
        pos = self.positions()
        return all(pos[p] >= off for p, off in ends.items())

    def close(self) -> None:
        self._consumer.close()
