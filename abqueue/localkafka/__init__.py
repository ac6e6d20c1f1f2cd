"""Real Apache Kafka (KRaft) on 127.0.0.1, one node or a replicated cluster, from Maven Central jars."""

from abqueue.localkafka.broker import BrokerError, LocalBroker, default_cache_dir
from abqueue.localkafka.cluster import LocalCluster

__all__ = ["BrokerError", "LocalBroker", "LocalCluster", "default_cache_dir"]
