"""Factories for kafka-python clients, so every command connects the same way."""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.base import MemberState
from kafka.errors import KafkaError

from abqueue.errors import AbqError
from abqueue.kafka.header_keys import read_unreadable_header_keys
from abqueue.kafka.redact import redact
from abqueue.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class KafkaUnavailable(AbqError):
    pass


def _unreachable(settings: KafkaSettings) -> KafkaUnavailable:
    return KafkaUnavailable(
        f"no Kafka broker answers at {settings.bootstrap_servers}; start one with `abq kafka up` "
        "or point ABQ_BOOTSTRAP_SERVERS (--bootstrap-servers) at your cluster"
    )


def _handshake_failed(settings: KafkaSettings) -> KafkaUnavailable:
    # The port is open (check_reachable passed) yet kafka-python could not bootstrap: in practice a
    # listener that wants another protocol, or credentials the broker refused.
    return KafkaUnavailable(
        f"a broker listens at {settings.bootstrap_servers} but refused or did not understand this client "
        f"(protocol {settings.security_protocol}, SASL {settings.sasl_mechanism or 'none'}); check "
        "ABQ_SECURITY_PROTOCOL, ABQ_SASL_MECHANISM, ABQ_SASL_USERNAME/PASSWORD and the TLS files"
    )


# How long a client may take to bootstrap once the port answers; kafka-python waits 30 s.
BOOTSTRAP_TIMEOUT_MS = 10_000


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


# kafka-python's own client metrics (sensors updated per record and per request) are read by nothing
# here: abqueue exports its own to Prometheus.
NO_CLIENT_METRICS = {"metrics_enabled": False}


def _build(cls, settings: KafkaSettings, defaults: dict[str, Any], overrides: dict[str, Any], *topics: str):
    check_reachable(settings)
    cfg = {"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS, **defaults, **settings.client_config(), **overrides}
    redact(cfg.get("sasl_plain_password"), cfg.get("ssl_password"))
    try:
        return cls(*topics, **cfg)
    except (KafkaError, OSError):
        raise _handshake_failed(settings) from None


def producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    # acks=all + idempotence: a retried send never duplicates or reorders within a partition.
    # linger 0: request-reply latency matters more than batching at low load, and under load the
    # client batches anyway while earlier requests are in flight.
    defaults = {"acks": "all", "enable_idempotence": True, "linger_ms": 0, **NO_CLIENT_METRICS}
    return _build(KafkaProducer, settings, defaults, overrides)


def consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> KafkaConsumer:
    read_unreadable_header_keys()  # one record with a non-UTF-8 header key must not stop every poll
    return _build(
        KafkaConsumer,
        settings,
        {"enable_auto_commit": False, "auto_offset_reset": "earliest", **NO_CLIENT_METRICS},
        overrides,
        *topics,
    )


def admin_client(settings: KafkaSettings, **overrides: Any) -> KafkaAdminClient:
    return _build(KafkaAdminClient, settings, {}, overrides)


def transient(e: BaseException) -> bool:
    """A Kafka error that passes once metadata moves on (a broker of several died, a leader moves)."""
    return isinstance(e, KafkaError) and bool(getattr(e, "retriable", False))


TRANSIENT_TRIES = 8  # about 15 s of backoff in all: longer than a cluster takes to move off a dead broker


def riding_out(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, tried again on transient Kafka errors with backoff (logged), as the rest of the client
    rides out a broker's death; the last error is raised if it does not pass."""
    from workers.backoff import retrying

    @functools.wraps(fn)
    def tried(*args: Any, **kwargs: Any) -> T:
        for attempt in retrying(fn.__name__, transient, TRANSIENT_TRIES, first_wait_s=0.25, max_wait_s=4.0):
            with attempt:
                return fn(*args, **kwargs)
        raise AssertionError("unreachable: retrying re-raises the last error")

    return tried


def release_parked_records(consumer: KafkaConsumer) -> None:
    """Work around kafka-python 3.0.12 stalling a resumed partition; call before every poll.

    Records fetched for a partition that is then paused are parked, and put back when it resumes, but
    only while the fetcher's in-line slot is None; a used-up slot holds an empty PartitionRecords
    instead, so they stay parked, and a partition with parked records is never fetched again.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if fetcher is not None and slot is not None and not slot:
        fetcher._next_partition_records = None


# How long a poll waits for a group join it takes part in (see `join_before_polling`). A join ends once
# every member has joined again, within one pass of each worker's loop: well under this. Nothing is lost
# by the wait: at a join's start a worker lets every partition go, with the work it held.
JOIN_WAIT_MS = 1000


def join_before_polling(consumer: KafkaConsumer, wait_ms: int = JOIN_WAIT_MS) -> None:
    """Work around kafka-python 3.0.12 forgetting group joins; call before every poll.

    A poll that gives up waiting for a join leaves it running, but the next poll reads it only if it
    is still running then: a finished one is thrown away and sent again, so a member polling without a
    wait (a busy worker) joins over and over (bench/rebalance.py: a member joining a busy one got its
    share after 4 s, 12 s, or not within 30 s; with this, 1.6 s each time). Where the join's reason
    is new partitions in the group leader's metadata, the leader's own assignment clears that reason:
    the next poll sees nothing to join and never reads the result, and the member stays `rebalancing`
    for good, heartbeats off, holding nothing new. Here a poll that joins waits for the join, and a
    join left unread is asked for again.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return
    # need_rejoin() is False for a consumer given its partitions by hand, whose state stays unjoined.
    if coordinator.state is MemberState.REBALANCING and not coordinator.need_rejoin():
        log.info("group %s: kafka-python left a join unread; joining again", coordinator.group_id)
        coordinator.request_rejoin()
    if coordinator.need_rejoin():
        coordinator.poll(timeout_ms=wait_ms)


# How long a fetch may park at the broker waiting for records. kafka-python leaves a partition out of
# the next fetch while records of it wait to be read, and that fetch parks: a record landing on the
# partition left out waits for the park to end. With one fixed park of 100 ms that was a worker's p99
# at one request at a time (about 110 ms in bench/overhead.py, against a p95 of 11); with 25 ms it was
# 17-21 ms. An idle consumer leaves nothing out, so a long park costs it no latency, and a short one
# costs CPU (an idle worker: 5% of a core at 25 ms, 1.5% at 100): the park follows the traffic (five
# runs: p99 13-32 ms; an idle worker 0.45% of a core).
BUSY_FETCH_WAIT_MS = 25
IDLE_FETCH_WAIT_MS = 500
BUSY_FOR_S = 2.0  # after the last records polled


class FetchPark:
    """Sets how long `consumer`'s fetches park at the broker from what its polls bring: short while
    records flow or partitions are paused (a backlog waits: a resumed partition is left out of the
    fetch parked meanwhile), long once idle. Call `polled` after every poll."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer
        self._last_records = float("-inf")
        self.polled(False)  # idle until records come, whatever the consumer was made with

    @property
    def wait_ms(self) -> int | None:
        """What kafka-python's next fetch will park for (None: kafka-python no longer says)."""
        fetcher = getattr(self._consumer, "_fetcher", None)
        return getattr(fetcher, "config", {}).get("fetch_max_wait_ms")

    def polled(self, got_records: bool) -> None:
        now = time.monotonic()
        if got_records:
            self._last_records = now
        busy = now - self._last_records < BUSY_FOR_S or bool(self._consumer.paused())
        wait = BUSY_FETCH_WAIT_MS if busy else IDLE_FETCH_WAIT_MS
        if self.wait_ms not in (wait, None):
            self._consumer._fetcher.config["fetch_max_wait_ms"] = wait  # read afresh for every fetch
