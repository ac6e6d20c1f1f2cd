"""Retries: transient engine failures are retried with backoff, for both kinds of engine; a batch
that fails as a whole is split to find the request that fails it, so one poisonous request costs an
error response, not a whole batch.

Failures reported while the engine call is still running (a static batch, or requests a streaming
engine refused at submission) are handled together: one retry for those that failed with the same
error, or a split where that error failed several requests. A failure reported later (a streaming
engine finishing one request) is retried on its own. Retries wait on a timer, never in the caller's
thread, so a continuous engine's event loop is never blocked.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

from workers.backoff import delay_s
from workers.engines.base import EngineDead, Result, TransientEngineError
from workers.middleware import Middleware
from workers.runners import Done, EngineCall

log = logging.getLogger(__name__)


def _timer(delay: float, fn: Callable[[], None]) -> None:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()


def _remap(done: Done, indices: list[int]) -> Done:
    return lambda j, result: done(indices[j], result)


class Retries(Middleware):
    def __init__(
        self,
        attempts: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        schedule: Callable[[float, Callable[[], None]], None] = _timer,
    ):
        self.attempts = attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.schedule = schedule

    def wrap_engine(self, worker, call: EngineCall) -> EngineCall:
        def attempt(requests, done: Done, tries: int) -> None:
            lock = threading.Lock()
            during_call = True
            held: list[tuple[int, BaseException]] = []
            answered: set[int] = set()

            def one(i: int, result: Result) -> None:
                with lock:
                    answered.add(i)
                    if isinstance(result, BaseException) and during_call:
                        held.append((i, result))
                        return
                if isinstance(result, BaseException):
                    settle([(i, result)])
                else:
                    done(i, result)

            def settle(failures: list[tuple[int, BaseException]]) -> None:
                by_error: dict[int, tuple[BaseException, list[int]]] = {}
                for i, e in failures:
                    by_error.setdefault(id(e), (e, []))[1].append(i)
                for error, idx in by_error.values():
                    again = [requests[i] for i in idx]
                    if isinstance(error, EngineDead):  # nothing to retry or split: the engine is gone
                        for i in idx:
                            done(i, error)
                    elif isinstance(error, TransientEngineError) and tries < self.attempts:
                        wait = delay_s(tries, self.backoff_s, self.max_backoff_s)
                        log.warning(
                            "engine: %s; retrying %d request(s) in %.1fs (attempt %d of %d)",
                            error,
                            len(idx),
                            wait,
                            tries + 1,
                            self.attempts,
                        )
                        self.schedule(wait, functools.partial(attempt, again, _remap(done, idx), tries + 1))
                    elif len(idx) > 1:
                        log.warning("engine failed a batch of %d (%s); splitting it", len(idx), error)
                        mid = len(idx) // 2
                        attempt(again[:mid], _remap(done, idx[:mid]), tries)
                        attempt(again[mid:], _remap(done, idx[mid:]), tries)
                    else:
                        done(idx[0], error)

            try:
                call(requests, one)
            except Exception as e:  # an inner wrapper that raises fails what it left unanswered
                with lock:
                    held += [(i, e) for i in range(len(requests)) if i not in answered]
            with lock:
                during_call = False
                failures = list(held)
            if failures:
                settle(failures)

        return lambda requests, done: attempt(requests, done, 1)
