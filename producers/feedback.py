"""Feedback: publish what a user thought of a response to the experiment's feedback topic."""

from __future__ import annotations

from abqueue.kafka import KafkaSettings, ensure_topics, producer
from schemas import ConfigError, ExperimentConfig, Feedback, encode


def publish_feedback(
    settings: KafkaSettings, experiment: ExperimentConfig, feedback: Feedback, timeout: float = 30.0
) -> None:
    """Publish and wait for Kafka's acknowledgement. Keyed by request id: all feedback on one
    response lands in one partition, in order, so the latest is the one that counts."""
    if feedback.experiment != experiment.name:
        raise ConfigError(f"feedback is for experiment {feedback.experiment!r}, this one is {experiment.name!r}")
    ensure_topics(settings, experiment)
    p = producer(settings)
    try:
        p.send(experiment.feedback_topic, key=feedback.request_id.encode(), value=encode(feedback)).get(timeout=timeout)
    finally:
        p.close()
