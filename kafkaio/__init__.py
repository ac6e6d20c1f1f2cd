"""Kafka connection settings and client factories shared by every abqueue command."""

from kafkaio.settings import KafkaSettings
from kafkaio.clients import admin_client, consumer, producer, release_parked_records
from kafkaio.topics import ensure_topic, ensure_topics, topic_max_message_bytes

__all__ = ["KafkaSettings", "admin_client", "consumer", "ensure_topic", "ensure_topics", "producer", "release_parked_records",
           "topic_max_message_bytes"]
