"""Kafka connection settings and client factories shared by every abqueue command."""

from abqueue.kafka.clients import (
    FetchPark,
    admin_client,
    consumer,
    join_before_polling,
    producer,
    release_parked_records,
)
from abqueue.kafka.settings import KafkaSettings
from abqueue.kafka.topics import RECORD_OVERHEAD, ensure_topic, ensure_topics, record_size, topic_max_message_bytes

__all__ = [
    "RECORD_OVERHEAD",
    "KafkaSettings",
    "record_size",
    "admin_client",
    "consumer",
    "ensure_topic",
    "ensure_topics",
    "producer",
    "join_before_polling",
    "release_parked_records",
    "FetchPark",
    "topic_max_message_bytes",
]
