"""Admission: which polled request goes to the engine next, and which partitions to stop fetching.

Each priority level has its own topic per variant (a pool's worker serves several variants) and
each topic a buffer of at most `capacity` polled records; a topic's partitions are paused while its
buffer is full, so memory stays bounded however deep the topics are, a backlog of low-priority work
never stands between the engine and a high-priority record, and one variant's flood never fills the
room another variant's records need.

The rule: the engine's free slots go to the highest level with waiting records, except that while
two or more levels wait, every `1/low_share`-th slot goes to the lower level whose head record has
waited longest. Lower levels therefore keep at least `low_share` of the throughput under any load
(10% by default) and are never starved. Within a level, the variants with waiting records take
turns, one slot each: while several wait each gets an equal share of the engine, whatever their
backlogs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from kafka import TopicPartition

from workers.message import Message


class Admission:
    def __init__(self, topics: Mapping[str, str | list[str]], capacity: int, low_share: float = 0.1):
        """topics: priority level -> its topic (or one topic per variant), highest level first."""
        if not 0 < low_share <= 0.5:
            raise ValueError("low_share must be in (0, 0.5]")
        self.levels = list(topics)
        self.topics: dict[str, list[str]] = {lvl: [t] if isinstance(t, str) else list(t) for lvl, t in topics.items()}
        self.capacity = capacity
        self.every = max(2, round(1 / low_share))
        self._buffers: dict[str, deque[Message]] = {t: deque() for ts in self.topics.values() for t in ts}
        self._turn: dict[str, int] = dict.fromkeys(self.levels, 0)  # whose turn it is within each level
        self._contended_picks = 0
        self._paused: set[TopicPartition] = set()

    def add(self, messages: list[Message]) -> None:
        for m in messages:
            self._buffers[m.record.topic].append(m)

    def waiting(self, level: str | None = None) -> int:
        topics: Iterable[str] = self._buffers if level is None else self.topics[level]
        return sum(len(self._buffers[t]) for t in topics)

    def room(self) -> int:
        """How many records one poll may bring without overfilling a buffer: the least room left in
        any topic still fetched (full ones are paused and bring none)."""
        return min((self.capacity - len(b) for b in self._buffers.values() if len(b) < self.capacity), default=0)

    def __len__(self) -> int:
        return self.waiting()

    def _head(self, level: str) -> float:
        return min(self._buffers[t][0].dequeued_at for t in self.topics[level] if self._buffers[t])

    def _take(self, level: str) -> Message:
        """The next record of `level`: from the next of its topics, in turn, that has one."""
        topics = self.topics[level]
        for step in range(len(topics)):
            i = (self._turn[level] + step) % len(topics)
            if self._buffers[topics[i]]:
                self._turn[level] = i + 1
                return self._buffers[topics[i]].popleft()
        raise LookupError(level)

    def pick(self, n: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < n:
            waiting = [lvl for lvl in self.levels if self.waiting(lvl)]
            if not waiting:
                break
            level = waiting[0]
            if len(waiting) > 1:
                self._contended_picks += 1
                if self._contended_picks % self.every == 0:
                    level = min(waiting[1:], key=self._head)
            out.append(self._take(level))
        return out

    def apply_pauses(self, consumer) -> None:
        """Pause the partitions of full buffers, resume the others; cheap when nothing changes."""
        full = {t for t, b in self._buffers.items() if len(b) >= self.capacity}
        want = {tp for tp in consumer.assignment() if tp.topic in full} if full else set()
        if want - self._paused:
            consumer.pause(*(want - self._paused))
        if self._paused - want:
            consumer.resume(*(self._paused - want))
        self._paused = want

    def drop(self, partitions) -> None:
        """Forget buffered records of revoked partitions (their new owner fetches them again)."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        for t, buf in self._buffers.items():
            self._buffers[t] = deque(m for m in buf if (m.record.topic, m.record.partition) not in gone)
        self._paused -= set(partitions)
