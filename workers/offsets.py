"""OffsetTracker: which offsets are safe to commit when requests finish out of order.

A partition's commit point is its lowest offset still unanswered (or one past the highest seen when
all are answered): committing further would skip a request if the worker died, committing less
only means redoing some. In exactly-once mode finished messages are also held here until the commit
point passes them, so each transaction carries exactly the responses its offsets cover.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from kafka import TopicPartition


@dataclass
class _Partition:
    pending: list[int] = field(default_factory=list)  # heap of offsets at or above the commit point
    tracked: set[int] = field(default_factory=set)  # the same offsets, for membership tests
    answered: dict[int, object] = field(default_factory=dict)  # answered, above the commit point
    next_offset: int = -1  # one past the highest offset seen
    # The last commit point known to be committed; at first, the first offset fetched, which is
    # where the group's commit stood when this worker got the partition.
    committed: int = -1
    resend: bool = False  # an asynchronous commit of this partition failed: send the point again


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        p = self._parts.setdefault(tp, _Partition())
        if offset in p.tracked:
            return
        if p.committed < 0:
            p.committed = offset
        heapq.heappush(p.pending, offset)
        p.tracked.add(offset)
        p.next_offset = max(p.next_offset, offset + 1)

    def owns(self, tp: TopicPartition, offset: int) -> bool:
        p = self._parts.get(tp)
        return p is not None and offset in p.tracked and offset not in p.answered

    def answer(self, tp: TopicPartition, offset: int, message: object = None) -> bool:
        """Marks an offset answered; False if it is not tracked (its partition was revoked)."""
        p = self._parts.get(tp)
        if p is None or offset in p.answered or offset not in p.tracked:
            return False
        p.answered[offset] = message
        return True

    def _advance(self, p: _Partition) -> list[object]:
        released = []
        while p.pending and p.pending[0] in p.answered:
            off = heapq.heappop(p.pending)
            p.tracked.discard(off)
            released.append(p.answered.pop(off))
        return released

    @staticmethod
    def _point(p: _Partition) -> int:
        return p.pending[0] if p.pending else p.next_offset

    def release(self) -> tuple[list[object], dict[TopicPartition, int]]:
        """Answered messages now below their partition's commit point, and the commit points that
        moved since the last call."""
        released, moved = [], {}
        for tp, p in self._parts.items():
            released += self._advance(p)
            point = self._point(p)
            if point > p.committed or (p.resend and point >= p.committed):
                moved[tp] = point
                p.resend = False
        return released, moved

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            if tp in self._parts:
                self._parts[tp].committed = max(self._parts[tp].committed, off)

    def points(self, partitions=None) -> dict[TopicPartition, int]:
        """The current commit point of each (given) partition, committed already or not."""
        return {
            tp: self._point(p)
            for tp, p in self._parts.items()
            if (partitions is None or tp in partitions) and self._point(p) >= 0
        }

    def commit_failed(self, partitions) -> None:
        for tp in partitions:
            if tp in self._parts:
                self._parts[tp].resend = True

    def restart_points(self, partitions) -> dict[TopicPartition, int]:
        """Where to consume these partitions from again after a failed transaction."""
        return {tp: p.committed for tp in partitions if (p := self._parts.get(tp)) is not None and p.committed >= 0}

    def held(self) -> int:
        """Answered offsets waiting above an unanswered one (exactly-once keeps their responses)."""
        return sum(len(p.answered) for p in self._parts.values())

    def unanswered(self, partitions=None) -> int:
        parts = self._parts if partitions is None else {tp: self._parts[tp] for tp in partitions if tp in self._parts}
        return sum(len(p.pending) - len(p.answered) for p in parts.values())

    def forget(self, partitions) -> None:
        for tp in partitions:
            self._parts.pop(tp, None)

    def __len__(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())
