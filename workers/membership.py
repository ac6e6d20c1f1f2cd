"""A worker left holding nothing while its partitions belong to no one joins its group again.

kafka-python was seen (once in CI, on a three-node cluster) leaving a worker out for good: its first
join assigned nothing (no partition metadata yet for its new topics), a broker was killed just then,
and it never joined again: 600 requests went unanswered for three minutes. Restarting the pod
would have fixed it: this does the same for the consumer alone. The likely cause, kafka-python
forgetting a join whose poll stopped waiting, is now worked around where the transport polls
(`abqueue.kafka.join_before_polling`); this stays as the net for whatever else strands one. A
worker that holds nothing because the group has more members than partitions is left alone: every
partition has an owner there.
"""

from __future__ import annotations

import logging

from workers.transport import Consumer

log = logging.getLogger(__name__)

# Longer than a rebalance normally takes (a session timeout, 10 s, for a killed member's partitions to
# move) so that a group in the middle of one is not disturbed; short next to a client's patience.
STRANDED_AFTER_S = 30.0
CHECK_EVERY_S = 1.0


class MembershipWatch:
    def __init__(self, consumer: Consumer, group: str, after_s: float = STRANDED_AFTER_S):
        self.consumer, self.group, self.after_s = consumer, group, after_s
        self.every_s = min(CHECK_EVERY_S, after_s)
        self.rejoins = 0
        self._next_check = 0.0
        self._empty_since: float | None = None

    def check(self, now: float) -> None:
        """Called on every pass of the loop; looks at the assignment once a second and asks the
        brokers at most once per `after_s`."""
        if now < self._next_check:
            return
        self._next_check = now + self.every_s
        if self.consumer.assignment():
            self._empty_since = None
            return
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since < self.after_s:
            return
        self._empty_since = now
        try:
            unowned = self.consumer.unowned_partitions()
        except Exception as e:  # a broker that will not describe the group: try again later
            log.warning("could not check group %s for partitions without an owner: %s", self.group, e)
            return
        if unowned:
            log.warning(
                "this worker has held no partitions for %.0fs while %d of its topics' partitions belong to no "
                "member of group %s; joining the group again with a fresh consumer",
                self.after_s,
                len(unowned),
                self.group,
            )
            self.consumer.rejoin()
            self.rejoins += 1
