"""Topic creation and the topic settings producers must respect."""

from __future__ import annotations

import logging

from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from abqueue.kafka import replication
from abqueue.kafka.clients import admin_client, riding_out
from abqueue.kafka.settings import KafkaSettings
from schemas.experiment import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

CANCEL_RETENTION_MS = 3_600_000  # a cancel matters while its request may still run

# Kafka's broker default for message.max.bytes; used when a topic's setting cannot be read.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588

# Bytes a record adds to its key, value and headers on the wire (record batch header, varints,
# timestamps); used so a record right at a topic's limit is refused or trimmed here, not by the broker.
RECORD_OVERHEAD = 128


def record_size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """A record's size as the broker measures it against max.message.bytes, give or take the overhead."""
    return len(key or b"") + len(value) + sum(len(k) + len(v) for k, v in headers) + RECORD_OVERHEAD


def _presence(admin, topics: list[str]) -> tuple[dict[str, dict], list[str]]:
    """(existing: name -> its metadata, missing) among `topics`. A topic this principal may not
    describe is in neither: Kafka answers TOPIC_AUTHORIZATION_FAILED whether or not it exists, and
    it is not this principal's to create or use (a worker's view of another variant's topics)."""
    existing, missing = {}, []
    for t in admin.describe_topics(topics):
        if t["error_code"] == 0:
            existing[t["name"]] = t
        elif t["error_code"] == UnknownTopicOrPartitionError.errno:
            missing.append(t["name"])
    return existing, sorted(missing)


@riding_out
def visible(settings: KafkaSettings, topic: str) -> bool:
    """False if this principal's ACLs hide `topic` (it may or may not exist: Kafka does not say)."""
    admin = admin_client(settings)
    try:
        return admin.describe_topics([topic])[0]["error_code"] != TopicAuthorizationFailedError.errno
    finally:
        admin.close()


@riding_out
def ensure_topic(
    settings: KafkaSettings,
    name: str,
    partitions: int = 1,
    configs: dict[str, str] | None = None,
) -> bool:
    """Create one topic unless it exists, replicated as the cluster's size calls for; True if this
    call created it."""
    admin = admin_client(settings)
    try:
        if not _presence(admin, [name])[1]:
            return False
        want = replication.for_experiment(admin, None, None)  # the cluster's default
        try:
            admin.create_topics(
                {
                    name: {
                        "num_partitions": partitions,
                        "replication_factor": want.factor,
                        "configs": {**want.topic_configs(), **(configs or {})},
                    }
                },
                wait_for_metadata=True,
            )
        except TopicAlreadyExistsError:
            return False  # another process won the race
        log.info("created topic %s (%s)", name, want)
        return True
    finally:
        admin.close()


@riding_out
def ensure_topics(settings: KafkaSettings, experiment: ExperimentConfig) -> list[str]:
    """Create the experiment's topics that do not exist yet; returns the ones created. Existing
    topics replicated less than configured are logged as a warning, never silently accepted."""
    admin = admin_client(settings)
    try:
        want = replication.for_experiment(admin, experiment.replication_factor, experiment.min_insync_replicas)
        wanted: dict[str, dict] = {}
        for v in experiment.variants:
            # The configured count; `abq deploy render` raises it to max_replicas in the KafkaTopics.
            for topic in experiment.request_topics(v.name).values():
                wanted[topic] = {"num_partitions": experiment.partitions}
        wanted[experiment.response_topic] = {"num_partitions": experiment.partitions}
        wanted[experiment.deadletter_topic] = {"num_partitions": 1}
        wanted[experiment.feedback_topic] = {"num_partitions": experiment.partitions}
        # A cancel matters while its request may still run: an hour of them, not the topic's history.
        wanted[experiment.cancel_topic] = {"num_partitions": 1, "configs": {"retention.ms": str(CANCEL_RETENTION_MS)}}
        if any(v.shadow_of for v in experiment.variants):
            wanted[experiment.shadow_response_topic] = {"num_partitions": experiment.partitions}
        existing, absent = _presence(admin, list(wanted))
        missing = {
            t: {
                **wanted[t],
                "replication_factor": want.factor,
                "configs": {**want.topic_configs(), **wanted[t].get("configs", {})},
            }
            for t in absent
        }
        for line in replication.weaker_topics(admin, existing, want):
            log.warning("%s", line)
        if missing:
            try:
                admin.create_topics(missing, wait_for_metadata=True)
            except TopicAlreadyExistsError:
                pass  # another process won the race; the topic is there either way
            except (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                # kafka-python's text holds the whole request's repr: thousands of characters.
                names = sorted(missing)
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise ConfigError(
                    f"topics {shown} of experiment {experiment.name} do not exist, and user "
                    f"{settings.sasl_username or '(no SASL user)'} may not create them; the operator creates an "
                    f"experiment's topics: `abq experiment apply FILE --create-topics` (docs/guides/kafka-security.md)"
                ) from None
            # The replication chosen is said where it is used: unset in the config, it follows the cluster's size.
            log.info("created topics %s (%s)", ", ".join(sorted(missing)), want)
        return sorted(missing)
    finally:
        admin.close()


@riding_out
def topic_max_message_bytes(settings: KafkaSettings, topics: list[str]) -> dict[str, int]:
    """The largest record each topic accepts (its max.message.bytes, else the broker default)."""
    admin = admin_client(settings)
    try:
        res = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, configs=None) for t in topics], config_filter="all"
        )
    finally:
        admin.close()
    out = {}
    for t in topics:
        try:
            out[t] = int(res["topic"][t]["max.message.bytes"]["value"])
        except (KeyError, TypeError, ValueError):
            out[t] = DEFAULT_MAX_MESSAGE_BYTES
    return out
