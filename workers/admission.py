"""Admission: which polled request goes to the engine next, and which partitions to stop fetching.

Each priority level has its own topic and a buffer of at most `capacity` polled records; a level's
partitions are paused while its buffer is full, so memory stays bounded however deep the topics
are, and a backlog of low-priority work never stands between the engine and a high-priority record.

The rule: the engine's free slots go to the highest level with waiting records, except that while
two or more levels wait, every `1/low_share`-th slot goes to the lower level whose head record has
waited longest. Lower levels therefore keep at least `low_share` of the throughput under any load
(10% by default) and are never starved.
"""

from __future__ import annotations

from collections import deque

from kafka import TopicPartition

from workers.message import Message


class Admission:
    def __init__(self, topics: dict[str, str], capacity: int, low_share: float = 0.1):
        """topics: priority level -> topic, highest level first."""
        if not 0 < low_share <= 0.5:
            raise ValueError("low_share must be in (0, 0.5]")
        self.levels = list(topics)
        self._level_of = {t: lvl for lvl, t in topics.items()}
        self.topics = topics
        self.capacity = capacity
        self.every = max(2, round(1 / low_share))
        self._buffers: dict[str, deque[Message]] = {lvl: deque() for lvl in self.levels}
        self._contended_picks = 0
        self._paused: set[TopicPartition] = set()

    def add(self, messages: list[Message]) -> None:
        for m in messages:
            self._buffers[self._level_of[m.record.topic]].append(m)

    def waiting(self, level: str | None = None) -> int:
        if level is not None:
            return len(self._buffers[level])
        return sum(len(b) for b in self._buffers.values())

    def room(self) -> int:
        """How many records one poll may bring without overfilling a level: the least room left in
        any level still fetched (full levels are paused and bring none)."""
        return min((self.capacity - len(b) for b in self._buffers.values() if len(b) < self.capacity), default=0)

    def __len__(self) -> int:
        return self.waiting()

    def pick(self, n: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < n:
            waiting = [lvl for lvl in self.levels if self._buffers[lvl]]
            if not waiting:
                break
            level = waiting[0]
            if len(waiting) > 1:
                self._contended_picks += 1
                if self._contended_picks % self.every == 0:
                    level = min(waiting[1:], key=lambda lvl: self._buffers[lvl][0].dequeued_at)
            out.append(self._buffers[level].popleft())
        return out

    def apply_pauses(self, consumer) -> None:
        """Pause the partitions of full levels, resume the others; cheap when nothing changes."""
        want: set[TopicPartition] = set()
        assigned = consumer.assignment()
        for lvl in self.levels:
            if len(self._buffers[lvl]) >= self.capacity:
                want |= {tp for tp in assigned if tp.topic == self.topics[lvl]}
        if want - self._paused:
            consumer.pause(*(want - self._paused))
        if self._paused - want:
            consumer.resume(*(self._paused - want))
        self._paused = want

    def drop(self, partitions) -> None:
        """Forget buffered records of revoked partitions (their new owner fetches them again)."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        for lvl, buf in self._buffers.items():
            self._buffers[lvl] = deque(m for m in buf if (m.record.topic, m.record.partition) not in gone)
        self._paused -= set(partitions)
