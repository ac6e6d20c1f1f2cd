"""Hostile records for a worker on the real broker: the strategies (hypothesis) and the check that
every record ends answered or dead-lettered with a reason, the worker alive and its commits at the
end. Shared by tests/test_fuzz.py (a few hundred examples in CI) and bench/fuzz.py (the figure)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import orjson
from hypothesis import strategies as st
from kafka import TopicPartition

from abqueue.kafka import KafkaSettings, consumer, ensure_topics, producer
from schemas import PRIORITIES, DeadLetter, ExperimentConfig, InferenceResponse, SchemaError, decode_request


class RawHeaderKey(str):
    """A header key kafka-python sends as these bytes, whatever they are (its producer only sends UTF-8)."""

    raw: bytes

    def __new__(cls, raw: bytes):
        key = super().__new__(cls, "raw")
        key.raw = raw
        return key

    def encode(self, *args, **kwargs) -> bytes:  # type: ignore[override]
        return self.raw


def _repeated(unit, least: int, most: int):
    """A long run of one unit, drawn by its length (so a failing example prints short)."""
    return st.integers(least, most).map(lambda n: unit * n)


def _json():
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
    )
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )  # fmt: skip


def _request(experiment: str, loose: bool):
    """Requests with every field drawn from valid values (`loose`: from values in and out of range)."""

    def pick(valid, invalid):
        return valid | invalid if loose else valid

    fields = {
        "id": pick(st.uuids().map(str), st.just("") | _repeated("x", 257, 300) | st.integers(-10, 10)),
        "experiment": pick(st.just(experiment), st.text(max_size=10)),
        "routing_key": pick(st.text(min_size=1, max_size=40), st.just("") | st.text(min_size=513, max_size=520)),
        "variant": pick(st.just("a"), st.none() | st.text(max_size=5)),
        "prompt": pick(st.text(min_size=1, max_size=200), st.none() | st.just("")),
    }
    optional = {
        "max_tokens": pick(st.integers(1, 64), st.integers(-5, 10_000)),
        "temperature": pick(st.floats(0, 2), st.floats(-1, 3, allow_nan=False)),
        "top_p": pick(st.floats(0.01, 1), st.floats(-0.5, 1.5, allow_nan=False)),
        "stop": pick(st.lists(st.text(min_size=1, max_size=4), max_size=3), st.lists(st.text(max_size=4), max_size=10)),
        "seed": pick(st.integers(0, 2**31), st.integers(-10, 2**64 - 1)),
        "n": pick(st.integers(1, 4), st.integers(-1, 20)),
        # In the past (expired), soon or far: the worker answers each differently.
        "deadline": pick(st.floats(0, 4e9), st.floats(-1e9, 1e12, allow_nan=False)),
        "reply_to": pick(
            st.sampled_from([f"abq.{experiment}.responses", f"abq.{experiment}.replies.gone", "abq.experiments",
                             "__consumer_offsets", f"abq.{experiment}.a.requests"]),
            st.text(max_size=300),
        ),
        "priority": pick(st.sampled_from(PRIORITIES), st.text(max_size=5)),
        "metadata": pick(st.dictionaries(st.text(max_size=8), _json(), max_size=3), _json()),
        "caller_tag": pick(st.text(max_size=64), st.text(min_size=65, max_size=80)),
    }  # fmt: skip
    if loose:
        optional["messages"] = st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "robot"]), "content": st.text(max_size=50)}
            ),
            max_size=3,
        )
        optional["schema_version"] = st.integers(0, 3)
    return st.fixed_dictionaries(fields, optional=optional).map(orjson.dumps)


def _headers():
    key = st.text(max_size=20) | st.binary(min_size=1, max_size=12).map(RawHeaderKey) | st.just("traceparent")
    value = (
        st.binary(max_size=64) | _repeated(b"f", 60, 120).map(lambda v: b"00-" + v) | _repeated(b"x", 50_000, 100_000)
    )
    return st.lists(st.tuples(key, value), max_size=4)


def records(experiment: str):
    """(key, value, headers): random bytes, JSON of random shapes, nearly valid requests; keys empty,
    missing or large; headers with keys that are not UTF-8, huge values, garbage traceparents."""
    value = (
        st.binary(max_size=300) | _json().map(orjson.dumps) | _request(experiment, loose=True)
        | _request(experiment, loose=False) | _request(experiment, loose=False)
    )  # fmt: skip
    key = st.none() | st.just(b"") | st.binary(max_size=40) | _repeated(b"k", 10_000, 60_000)
    return st.tuples(key, value, _headers())


class FuzzTarget:
    """A thread worker on a fresh experiment, with readers of its responses and dead letters."""

    def __init__(self, settings: KafkaSettings):
        from workers.engines.factory import make_engine
        from workers.worker import Worker

        self.settings = settings
        self.exp = ExperimentConfig(
            name=f"fz{uuid.uuid4().hex[:8]}", partitions=1, variants=[{"name": "a", "weight": 100}]
        )
        ensure_topics(settings, self.exp)
        self.topic = self.exp.request_topic("a")
        self.worker = Worker.from_settings(settings, self.exp, "a", make_engine(self.exp.variant("a")))
        self.crashed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.producer = producer(settings, max_request_size=2_000_000)
        self.readers = {}
        for name, topic in (("responses", self.exp.response_topic), ("dead", self.exp.deadletter_topic)):
            c = consumer(settings, group_id=None)
            c.assign([TopicPartition(topic, 0)])
            c.seek_to_beginning()
            self.readers[name] = c
        # Reads the worker group's commits (it never joins the group).
        self._commits = consumer(settings, group_id=self.exp.consumer_group("a"))
        self.answered: set[str] = set()
        self.dead: dict[int, DeadLetter] = {}
        self.outcomes: Counter[str] = Counter()
        self.records = 0

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:
            self.crashed = e

    def check(self, batch: list[tuple], timeout: float = 30.0) -> None:
        """Publish `batch`, then wait until each record is answered or dead-lettered; fails otherwise."""
        futures = [
            self.producer.send(self.topic, key=k, value=v, headers=[(hk, hv) for hk, hv in h]) for k, v, h in batch
        ]
        self.producer.flush()
        offsets = [f.get(timeout=30).offset for f in futures]
        expect: dict[int, str | None] = {}
        for off, (_, value, _) in zip(offsets, batch, strict=True):
            try:
                expect[off] = decode_request(value).id
            except SchemaError:
                expect[off] = None
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            missing = [
                o for o, rid in expect.items() if o not in self.dead and (rid is None or rid not in self.answered)
            ]
            if not missing and self._committed() >= offsets[-1] + 1:
                break
            assert self.crashed is None and self.thread.is_alive(), f"the worker died: {self.crashed!r}"
            assert time.monotonic() < deadline, (
                f"records at offsets {missing} neither answered nor dead-lettered within {timeout}s "
                f"(committed {self._committed()}, end {offsets[-1] + 1})"
            )
        for o in expect:
            self.outcomes["dead_letter:" + self.dead[o].reason if o in self.dead else "answered"] += 1
        self.records += len(batch)

    def _committed(self) -> int:
        return self._commits.committed(TopicPartition(self.topic, 0)) or 0

    def _read(self) -> None:
        for name, c in self.readers.items():
            for recs in c.poll(timeout_ms=50).values():
                for r in recs:
                    if name == "responses":
                        self.answered.add(InferenceResponse.model_validate_json(r.value).request_id)
                    else:
                        dl = DeadLetter.model_validate_json(r.value)
                        assert dl.reason and dl.detail, dl
                        self.dead[dl.source_offset] = dl

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(30)
        self.producer.close()
        for c in [*self.readers.values(), self._commits]:
            c.close()
