"""EngineTimeout: a request the engine has not answered within `seconds` (retries included) is
answered with an `engine_error` and aborted in the engine where the engine can abort. One stuck
request must not hold its partition's commit point, nor an engine slot, for as long as the worker
lives. A later answer from the engine is ignored (the runner takes one answer per request)."""

from __future__ import annotations

import logging
import time

from workers.calls import CallAnswers
from workers.deadlines import Deadlines
from workers.engines.base import EngineError
from workers.middleware import Middleware
from workers.runners import Done, EngineCall

log = logging.getLogger(__name__)


class EngineTimedOut(EngineError):
    pass


class EngineTimeout(Middleware):
    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._deadlines = Deadlines("abq-engine-timeouts", "an engine timeout")

    def wrap_engine(self, worker, call: EngineCall) -> EngineCall:
        if not self.seconds:
            return call
        seconds = self.seconds

        def expire(c: CallAnswers) -> None:
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
            c = CallAnswers(requests, done)
            # One deadline per call, not per request: what waits in the heap grows with calls, not requests.
            self._deadlines.at(time.monotonic() + seconds, lambda: expire(c), lambda: bool(c.left))

            def answer(i: int, result) -> None:
                c.answer(i, result)

            call(requests, answer)

        return timed
