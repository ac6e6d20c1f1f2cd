"""Control plane state kept in compacted Kafka topics: live experiment configs and rollouts."""
