"""RequestPublisher: assigns a variant and writes the request to that variant's topic."""

from __future__ import annotations

import logging

from kafka.producer.future import FutureRecordMetadata

from abqueue.errors import AbqError
from abqueue.kafka import (
    RECORD_OVERHEAD,
    KafkaSettings,
    ensure_topics,
    producer,
    record_size,
    topic_max_message_bytes,
    tracing,
)
from producers.assignment import assign, shadow_copies
from schemas import ConfigError, ExperimentConfig, InferenceRequest, encode
from schemas.stream import Cancel, encode_cancel

log = logging.getLogger(__name__)


class RequestTooLarge(AbqError, ValueError):
    pass


class RequestPublisher:
    """Publishes requests of one experiment. Thread-safe (kafka-python's producer is)."""

    def __init__(self, settings: KafkaSettings, experiment: ExperimentConfig, create_topics: bool = True, follow=None):
        """`follow`: a ConfigFollower; the experiment's live config then replaces `experiment`
        as soon as a new version is applied (new variants get their topics first)."""
        self.settings = settings
        # The experiment and its live config version (None: a file, not the live config), swapped as
        # one so that a request's weights and the version it records always belong together.
        self._live: tuple[ExperimentConfig, int | None] = (experiment, None)
        self.create_topics = create_topics
        if create_topics:
            ensure_topics(settings, experiment)
        self._max_bytes = topic_max_message_bytes(settings, self._topics(experiment))
        # The producer must accept what the largest topic accepts, or it refuses first with a vaguer error.
        self._producer = producer(settings, max_request_size=max(self._max_bytes.values()) + RECORD_OVERHEAD)
        if follow is not None:
            follow.watch(experiment, self._config_changed)

    @staticmethod
    def _topics(experiment: ExperimentConfig) -> list[str]:
        return [t for v in experiment.variants for t in experiment.request_topics(v.name).values()]

    def _config_changed(self, record) -> None:
        new = record.experiment
        if self.create_topics:
            ensure_topics(self.settings, new)  # before any request can be routed to a new variant
        self._max_bytes = {**self._max_bytes, **topic_max_message_bytes(self.settings, self._topics(new))}
        old = ", ".join(f"{v.name} {v.weight:g}" for v in self.experiment.variants)
        weights = ", ".join(f"{v.name} {v.weight:g}" for v in new.variants)
        self._live = (new, record.version)
        # The first config read (the live one where the file was used so far) is news only if it differs.
        log.info(
            "experiment %s v%d: weights %s%s",
            new.name,
            record.version,
            weights,
            f" (were {old})" if old != weights else "",
        )

    @property
    def experiment(self) -> ExperimentConfig:
        return self._live[0]

    def assign(
        self, request: InferenceRequest, experiment: ExperimentConfig | None = None, version: int | None = None
    ) -> InferenceRequest:
        """The request with its variant set (kept if the caller pinned a known one), and the config
        version whose weights chose it."""
        if experiment is None:
            experiment, version = self._live
        if request.experiment != experiment.name:
            raise ConfigError(
                f"request {request.id} is for experiment {request.experiment!r}, this producer serves "
                f"{experiment.name!r}; pass the matching --config"
            )
        if request.variant is not None:
            pinned = experiment.variant(request.variant)  # raises ConfigError naming the known variants
            if pinned.shadow_of is not None:
                raise ConfigError(
                    f"request {request.id} is pinned to {pinned.name!r}, a shadow of {pinned.shadow_of!r} whose "
                    f"answers no caller receives; pin it to {pinned.shadow_of!r} (its requests are copied to the shadow)"
                )
            return request if request.assigned_by else request.model_copy(update={"assigned_by": "pinned"})
        variant, by = assign(experiment, request.routing_key, request.metadata)
        return request.model_copy(update={"variant": variant, "assigned_by": by, "config_version": version})

    def publish(
        self, request: InferenceRequest, traceparent: str | None = None
    ) -> tuple[InferenceRequest, FutureRecordMetadata]:
        """Send without waiting; returns the assigned request and the send's future."""
        experiment, version = self._live  # one version for the whole call, whatever the follower does meanwhile
        request = self.assign(request, experiment, version)
        if request.reply_to and (refused := experiment.reply_to_refusal(request.reply_to)):
            raise ConfigError(refused)  # workers would refuse it too, after a trip through the queue
        variant = request.variant
        assert variant is not None, "assign() sets the variant"
        topic = experiment.request_topic(variant, request.priority)
        value = encode(request)
        key = request.routing_key.encode()
        tp = traceparent if traceparent and tracing.is_valid(traceparent) else tracing.new_traceparent()
        headers = [(tracing.HEADER, tp.encode("ascii"))]
        size = record_size(key, value, headers)
        limit = self._max_bytes[topic]
        if size > limit:
            raise RequestTooLarge(
                f"request {request.id} is {size} bytes and topic {topic} accepts at most {limit} "
                "(max.message.bytes); shorten the prompt or raise the topic's max.message.bytes"
            )
        future = self._producer.send(topic, key=key, value=value, headers=headers)
        for shadow in shadow_copies(experiment, variant, request.routing_key):
            # Same id, so the two answers can be paired; no reply_to: a shadow never answers a caller,
            # and so never streams (a copy asking for a stream without a reply topic is refused).
            update: dict = {"variant": shadow, "assigned_by": f"shadow:{request.variant}", "reply_to": None}
            if request.body is not None and "stream" in request.body:
                update["body"] = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
            copy = request.model_copy(update=update)
            self._producer.send(
                experiment.request_topic(shadow, request.priority), key=key, value=encode(copy), headers=headers
            )
        return request, future

    def send_cancel(self, cancel: Cancel):
        """Put a cancel on the experiment's cancel topic; returns the send's future."""
        return self._producer.send(
            self.experiment.cancel_topic, key=cancel.request_id.encode(), value=encode_cancel(cancel)
        )

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=timeout)

    def close(self) -> None:
        self._producer.close()
