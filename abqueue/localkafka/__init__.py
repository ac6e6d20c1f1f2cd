"""A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, from Maven Central jars."""

from abqueue.localkafka.broker import BrokerError, LocalBroker, default_cache_dir

__all__ = ["BrokerError", "LocalBroker", "default_cache_dir"]
