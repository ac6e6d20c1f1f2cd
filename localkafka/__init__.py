"""A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, from Maven Central jars."""

from localkafka.broker import LocalBroker, BrokerError, default_cache_dir

__all__ = ["BrokerError", "LocalBroker", "default_cache_dir"]
