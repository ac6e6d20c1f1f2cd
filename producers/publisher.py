"""RequestPublisher: assigns a variant and writes the request to that variant's topic."""

from __future__ import annotations

import logging

from kafka.producer.future import FutureRecordMetadata

from kafkaio import KafkaSettings, ensure_topics, producer, topic_max_message_bytes
from producers import tracing
from producers.assignment import assign_variant
from schemas import ConfigError, ExperimentConfig, InferenceRequest, encode

log = logging.getLogger(__name__)

# Bytes a record adds to its key, value and headers on the wire (record batch header, varints,
# timestamps); used so a request right at the limit is refused here, not by the broker.
RECORD_OVERHEAD = 128


class RequestTooLarge(ValueError):
    pass


class RequestPublisher:
    """Publishes requests of one experiment. Thread-safe (kafka-python's producer is)."""

    def __init__(self, settings: KafkaSettings, experiment: ExperimentConfig, create_topics: bool = True):
        self.experiment = experiment
        if create_topics:
            ensure_topics(settings, experiment)
        topics = [t for v in experiment.variants for t in experiment.request_topics(v.name).values()]
        self._max_bytes = topic_max_message_bytes(settings, topics)
        # The producer must accept what the largest topic accepts, or it refuses first with a vaguer error.
        self._producer = producer(settings, max_request_size=max(self._max_bytes.values()) + RECORD_OVERHEAD)

    def assign(self, request: InferenceRequest) -> InferenceRequest:
        """The request with its variant set (kept if the caller pinned a known one)."""
        if request.experiment != self.experiment.name:
            raise ConfigError(
                f"request {request.id} is for experiment {request.experiment!r}, this producer serves "
                f"{self.experiment.name!r}; pass the matching --config"
            )
        if request.variant is not None:
            self.experiment.variant(request.variant)  # raises ConfigError naming the known variants
            return request
        return request.model_copy(update={"variant": assign_variant(self.experiment, request.routing_key)})

    def publish(self, request: InferenceRequest, traceparent: str | None = None) -> tuple[InferenceRequest, FutureRecordMetadata]:
        """Send without waiting; returns the assigned request and the send's future."""
        request = self.assign(request)
        topic = self.experiment.request_topic(request.variant, request.priority)
        value = encode(request)
        key = request.routing_key.encode()
        tp = traceparent if traceparent and tracing.is_valid(traceparent) else tracing.new_traceparent()
        headers = [(tracing.HEADER, tp.encode("ascii"))]
        size = len(value) + len(key) + sum(len(k) + len(v) for k, v in headers) + RECORD_OVERHEAD
        limit = self._max_bytes[topic]
        if size > limit:
            raise RequestTooLarge(
                f"request {request.id} is {size} bytes and topic {topic} accepts at most {limit} "
                "(max.message.bytes); shorten the prompt or raise the topic's max.message.bytes"
            )
        return request, self._producer.send(topic, key=key, value=value, headers=headers)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=timeout)

    def close(self) -> None:
        self._producer.close()
