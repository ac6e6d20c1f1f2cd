"""EngineTimeout: a request the engine has not answered within `seconds` (retries included) is
answered with an `engine_error` and aborted in the engine where the engine can abort. One stuck
request must not hold its partition's commit point, nor an engine slot, for as long as the worker
lives. A later answer from the engine is ignored (the runner takes one answer per request)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from workers.engines.base import EngineError
from workers.middleware import Middleware
from workers.runners import Done, EngineCall

log = logging.getLogger(__name__)


class EngineTimedOut(EngineError):
    pass


class _Call:
    """One engine call's requests until each is answered once (by the engine or by the deadline).
    Once all are, it lets go of them and of the runner's callback, which holds the call's messages:
    the deadline waiting in the heap holds nothing large."""

    def __init__(self, requests: list, done: Done):
        self.requests: list | None = requests
        self.answered = [False] * len(requests)
        self.left = len(requests)
        self._done: Done | None = done
        self._lock = threading.Lock()

    def answer(self, i: int, result) -> bool:
        with self._lock:
            if self.answered[i]:
                return False
            self.answered[i] = True
            self.left -= 1
            done = self._done
            if not self.left:
                self.requests, self._done = None, None
        assert done is not None, "a call with a request unanswered keeps its callback"
        done(i, result)
        return True


class _Deadlines:
    """One thread for every pending deadline (a timer thread per request would be one per slot).
    A call answered in time leaves its entry behind; entries of answered calls are swept out
    whenever the heap has doubled since the last sweep, so it stays within twice the calls still
    unanswered (plus a floor), whatever the timeout."""

    SWEEP_FLOOR = 1024

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Call, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sweep_at = self.SWEEP_FLOOR

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, call: _Call, fn: Callable[[], None]) -> None:
        with self._cond:
            if len(self._heap) >= self._sweep_at:
                self._heap = [e for e in self._heap if e[2].left]
                heapq.heapify(self._heap)
                self._sweep_at = max(self.SWEEP_FLOOR, 2 * len(self._heap))
            heapq.heappush(self._heap, (when, next(self._seq), call, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="abq-engine-timeouts", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is call:
                # Only an earlier deadline changes what the thread waits for; waking it per engine call
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
                log.exception("an engine timeout failed to fire")


class EngineTimeout(Middleware):
    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._deadlines = _Deadlines()

    def wrap_engine(self, worker, call: EngineCall) -> EngineCall:
        if not self.seconds:
            return call
        seconds = self.seconds

        def expire(c: _Call) -> None:
            requests = c.requests
            for i, request in enumerate(requests or ()):
                if c.answered[i]:
                    continue
                abort = getattr(worker.engine, "abort", None)
                if abort is not None:
                    try:
                        abort(request)
                    except Exception:
                        log.exception("could not abort request %s in the engine", request.id)
                error = EngineTimedOut(
                    f"the engine did not answer within {seconds:g}s (--request-timeout); the request was aborted"
                )
                if c.answer(i, error):
                    log.error("request %s: %s", request.id, error)

        def timed(requests, done: Done) -> None:
            c = _Call(requests, done)
            # One deadline per call, not per request: what waits in the heap grows with calls, not requests.
            self._deadlines.at(time.monotonic() + seconds, c, lambda: expire(c))

            def answer(i: int, result) -> None:
                c.answer(i, result)

            call(requests, answer)

        return timed
