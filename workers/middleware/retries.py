"""Retries: transient engine failures are retried with backoff; a failing batch is split to find
the request that fails it, so one poisonous request costs an error response, not a whole batch."""

from __future__ import annotations

import logging

from workers.backoff import retrying
from workers.engine import Completion, TransientEngineError
from workers.middleware import Middleware

log = logging.getLogger(__name__)


class Retries(Middleware):
    def __init__(self, attempts: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 10.0):
        self.attempts = attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s

    def wrap_engine(self, worker, call):
        def with_retries(requests):
            return retrying("engine", TransientEngineError, self.attempts, self.backoff_s, self.max_backoff_s)(call, requests)

        def isolate(requests):
            try:
                results = with_retries(requests)
                if len(results) != len(requests):
                    raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
                return results
            except Exception as e:  # the worker must survive whatever the engine raises
                if len(requests) == 1:
                    log.error("engine failed request %s: %s", requests[0].id, e)
                    return [Completion.failed(str(e) or type(e).__name__)]
                mid = len(requests) // 2
                log.warning("engine failed a batch of %d (%s); splitting it", len(requests), e)
                return isolate(requests[:mid]) + isolate(requests[mid:])

        return isolate
