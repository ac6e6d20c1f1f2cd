"""Reading a whole topic: all of it however long it takes, or an error, never a silent prefix."""

import time
from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from abqueue.kafka import reader


class SlowTopic:
    """A consumer over one partition of `n` records that hands out `per_poll` per poll (0: stalls)."""

    def __init__(self, n: int, per_poll: int):
        self.n, self.per_poll, self.pos = n, per_poll, 0
        self.tp = TopicPartition("t", 0)

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, tps): ...

    def seek_to_beginning(self, *tps): ...

    def end_offsets(self, tps):
        return {self.tp: self.n}

    def position(self, tp):
        return self.pos

    def poll(self, timeout_ms):
        time.sleep(0.001)  # a poll takes time: 10,000 records at 7 a poll take longer than timeout_s
        take = min(self.per_poll, self.n - self.pos)
        records = [SimpleNamespace(offset=self.pos + i) for i in range(take)]
        self.pos += take
        return {self.tp: records} if records else {}

    def close(self): ...


def test_a_topic_is_read_to_its_end_however_many_polls_it_takes(monkeypatch):
    monkeypatch.setattr(reader, "consumer", lambda *a, **kw: SlowTopic(n=10_000, per_poll=7))
    # At least 1.4 s of polls in all, more than timeout_s: the timeout is per stall, not per read
    # (0.5 s was once exceeded by a single stall of a loaded CI machine).
    records = reader.read_to_end(SimpleNamespace(), "t", timeout_s=1.0)
    assert [r.offset for r in records] == list(range(10_000))


def test_a_read_that_stops_coming_is_an_error_not_a_prefix(monkeypatch):
    topic = SlowTopic(n=100, per_poll=0)
    monkeypatch.setattr(reader, "consumer", lambda *a, **kw: topic)
    with pytest.raises(reader.PartialRead, match=r"read 0 of about 100 records of topic t"):
        reader.read_to_end(SimpleNamespace(), "t", timeout_s=0.3)
