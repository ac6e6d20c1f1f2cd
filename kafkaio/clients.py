"""Factories for kafka-python clients, so every command connects the same way."""

from __future__ import annotations

import socket
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from kafkaio.settings import KafkaSettings


class KafkaUnavailable(RuntimeError):
    pass


def _unreachable(settings: KafkaSettings) -> KafkaUnavailable:
    return KafkaUnavailable(
        f"no Kafka broker answers at {settings.bootstrap_servers}; start one with `abq kafka up` "
        "or point ABQ_BOOTSTRAP_SERVERS (--bootstrap-servers) at your cluster"
    )


def check_reachable(settings: KafkaSettings, timeout: float = 5.0) -> None:
    """Fail in seconds, not after kafka-python's 30 s bootstrap timeout, when no broker listens."""
    for server in settings.client_config()["bootstrap_servers"]:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return
        except (OSError, ValueError):
            continue
    raise _unreachable(settings)


def producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    # acks=all + idempotence: a retried send never duplicates or reorders within a partition.
    check_reachable(settings)
    # linger 0: request-reply latency matters more than batching at low load, and under load the
    # client batches anyway while earlier requests are in flight.
    cfg = {"acks": "all", "enable_idempotence": True, "linger_ms": 0, **settings.client_config(), **overrides}
    try:
        return KafkaProducer(**cfg)
    except (KafkaError, OSError):
        raise _unreachable(settings) from None


def consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> KafkaConsumer:
    check_reachable(settings)
    cfg = {"enable_auto_commit": False, "auto_offset_reset": "earliest", **settings.client_config(), **overrides}
    try:
        return KafkaConsumer(*topics, **cfg)
    except (KafkaError, OSError):
        raise _unreachable(settings) from None


def admin_client(settings: KafkaSettings, **overrides: Any) -> KafkaAdminClient:
    check_reachable(settings)
    try:
        return KafkaAdminClient(**settings.client_config(), **overrides)
    except (KafkaError, OSError):
        raise _unreachable(settings) from None
