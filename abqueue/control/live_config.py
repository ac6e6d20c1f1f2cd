"""Experiment configs live in a compacted Kafka topic, keyed by experiment name, so a weight change
reaches every producer in seconds without a restart or a redeploy.

`apply` validates and publishes a new version; `ConfigFollower` reads the topic from the start in
a thread and keeps the latest version of each experiment, calling back on every change. The topic
keeps superseded versions for at least a week (min.compaction.lag.ms), which `history` reads.
"""

from __future__ import annotations

import getpass
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable

from kafka import TopicPartition
from pydantic import BaseModel, ConfigDict, Field

from abqueue.control.store import KeyedStore
from abqueue.kafka import KafkaSettings, consumer
from abqueue.kafka.clients import riding_out
from schemas import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

CONFIG_TOPIC = "abq.experiments"
HISTORY_KEPT_MS = 7 * 24 * 3600 * 1000


class ConfigRecord(BaseModel):
    """One version of an experiment's config, as stored in the config topic."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    experiment: ExperimentConfig
    version: int = Field(ge=1)
    applied_at: float
    applied_by: str
    comment: str | None = None


CONFIGS: KeyedStore[ConfigRecord] = KeyedStore(
    CONFIG_TOPIC, ConfigRecord, {"min.compaction.lag.ms": str(HISTORY_KEPT_MS)}
)


def ensure_config_topic(settings: KafkaSettings) -> None:
    CONFIGS.ensure(settings)


def read_all(settings: KafkaSettings, name: str | None = None, timeout_s: float = 10.0) -> list[ConfigRecord]:
    """Every version still in the topic, oldest first (of one experiment, if named)."""
    return winners(rec for _, rec in CONFIGS.history(settings, name, timeout_s) if rec is not None)


def winners(records: Iterable[ConfigRecord]) -> list[ConfigRecord]:
    """The versions that count, in the topic's order: a record whose version is not above the last
    one of its experiment lost a race (two writers read version N and both wrote N+1) and is
    passed over. The topic has one partition, so every reader sees one order and the same winners;
    the loser's writer sees it lost and writes again (`apply`)."""
    last: dict[str, int] = {}
    out = []
    for rec in records:
        if rec.version > last.get(rec.experiment.name, 0):
            last[rec.experiment.name] = rec.version
            out.append(rec)
    return out


def current(settings: KafkaSettings, name: str) -> ConfigRecord | None:
    versions = read_all(settings, name)
    return versions[-1] if versions else None


APPLY_TRIES = 10


def apply(settings: KafkaSettings, experiment: ExperimentConfig, comment: str | None = None) -> ConfigRecord:
    """Publish `experiment` as its next version (it was validated when it was built). Versions are
    unique and ordered whatever the writers do: where another writer published the same version
    first, this one is written again as the version after it."""
    for _ in range(APPLY_TRIES):
        prev = current(settings, experiment.name)
        record = ConfigRecord(
            experiment=experiment,
            version=(prev.version + 1) if prev else 1,
            applied_at=time.time(),
            applied_by=f"{getpass.getuser()}@{socket.gethostname()}",
            comment=comment,
        )
        CONFIGS.put(settings, experiment.name, record)
        if any(rec == record for rec in read_all(settings, experiment.name)):
            return record
        log.info("config version %d of %s was taken by another writer; applying again", record.version, experiment.name)
    raise ConfigError(
        f"could not apply {experiment.name}: other writers took each of {APPLY_TRIES} versions in turn; try again"
    )


class ConfigFollower:
    """Follows the config topic in a daemon thread; `get(name)` is the newest version seen."""

    def __init__(
        self, settings: KafkaSettings, on_change: Callable[[ConfigRecord], None] | None = None, poll_ms: int = 200
    ):
        ensure_config_topic(settings)
        self._latest: dict[str, ConfigRecord] = {}
        self._callbacks = [on_change] if on_change else []
        self._stop = threading.Event()
        self._consumer = consumer(settings, group_id=None, isolation_level="read_committed", fetch_max_wait_ms=poll_ms)
        tp = TopicPartition(CONFIG_TOPIC, 0)
        self._consumer.assign([tp])
        self._consumer.seek_to_beginning(tp)
        self._end = riding_out(self._consumer.end_offsets)([tp])[tp]  # a broker of several may have just died
        self._tp = tp
        self.caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(poll_ms,), name="abq-config", daemon=True)
        self._thread.start()

    def on_change(self, callback: Callable[[ConfigRecord], None]) -> None:
        self._callbacks.append(callback)

    def watch(self, experiment: ExperimentConfig, callback: Callable[[ConfigRecord], None]) -> None:
        """Call back with each live version of `experiment` new to this watch, starting with the live
        one now: a version that repeats the config in use still comes (its number stamps requests)."""
        in_use: dict = {"config": experiment, "version": None}

        def changed(record: ConfigRecord) -> None:
            if record.experiment.name != experiment.name or (
                record.experiment == in_use["config"] and record.version == in_use["version"]
            ):
                return
            in_use["config"], in_use["version"] = record.experiment, record.version
            callback(record)

        self.on_change(changed)
        if (live := self.get(experiment.name)) is not None:
            changed(live)

    def get(self, name: str) -> ConfigRecord | None:
        return self._latest.get(name)

    def _run(self, poll_ms: int) -> None:
        while not self._stop.is_set():
            try:
                for recs in self._consumer.poll(timeout_ms=poll_ms).values():
                    for r in recs:
                        self._take(r)
                if not self.caught_up.is_set() and self._consumer.position(self._tp) >= self._end:
                    self.caught_up.set()
            except Exception as e:  # a follower that dies silently would freeze every producer's weights
                log.error("config follower: %s; retrying", e)
                time.sleep(1)

    def _take(self, r) -> None:
        if r.value is None:
            self._latest.pop(r.key.decode(errors="replace") if r.key else "", None)
            return
        rec = CONFIGS.parse(r.value, f"offset {r.offset}")
        if rec is None:
            return
        old = self._latest.get(rec.experiment.name)
        if old is not None and old.version >= rec.version:  # an older version, or one that lost a race (winners)
            return
        self._latest[rec.experiment.name] = rec
        for cb in self._callbacks:
            try:
                cb(rec)
            except Exception as e:
                log.error("config change handler failed for %s v%d: %s", rec.experiment.name, rec.version, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()
