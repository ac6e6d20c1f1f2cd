"""Deadlines: one thread that calls each callback when its time comes, for the engine's time limit
on a request and a hook call's time limit alike (a timer thread per request would be one per slot)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Deadlines:
    """Pending deadlines on one thread, started with the first. An entry whose `pending()` has
    turned false (its call was answered in time) stays behind; such entries are swept out whenever
    the heap has doubled since the last sweep, so it stays within twice the calls still pending
    (plus a floor), whatever the time limit."""

    SWEEP_FLOOR = 1024

    def __init__(self, thread_name: str, what: str) -> None:
        """what: the callbacks, as a failed one is logged ("an engine timeout")."""
        self._thread_name, self._what = thread_name, what
        self._heap: list[tuple[float, int, Callable[[], bool], Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sweep_at = self.SWEEP_FLOOR

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, fn: Callable[[], None], pending: Callable[[], bool]) -> None:
        """Call fn() at `when` (time.monotonic()); pending() says whether it is still wanted."""
        entry = (when, next(self._seq), pending, fn)
        with self._cond:
            if len(self._heap) >= self._sweep_at:
                self._heap = [e for e in self._heap if e[2]()]
                heapq.heapify(self._heap)
                self._sweep_at = max(self.SWEEP_FLOOR, 2 * len(self._heap))
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                # Only an earlier deadline changes what the thread waits for; waking it per call
                # cost a thread switch per call, taken from the loop's time.
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("%s failed to fire", self._what)
