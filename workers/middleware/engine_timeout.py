"""EngineTimeout: a request the engine has not answered within `seconds` (retries included) is
answered with an `engine_error` and aborted in the engine where the engine can abort. One stuck
request must not hold its partition's commit point, nor an engine slot, for as long as the worker
lives. A later answer from the engine is ignored (the runner takes one answer per request)."""

from __future__ import annotations

import logging
import threading
import time

from workers.deadlines import Deadlines
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


class EngineTimeout(Middleware):
    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._deadlines = Deadlines("abq-engine-timeouts", "an engine timeout")

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
            self._deadlines.at(time.monotonic() + seconds, lambda: expire(c), lambda: bool(c.left))

            def answer(i: int, result) -> None:
                c.answer(i, result)

            call(requests, answer)

        return timed
