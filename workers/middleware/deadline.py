"""Deadline: a request past its deadline is answered with an `expired` error, never run."""

from __future__ import annotations

import time

from schemas import ErrorInfo
from workers.middleware import Middleware


class Deadline(Middleware):
    def before_batch(self, worker, batch) -> None:
        now = time.time()
        for m in batch:
            if m.done or m.request is None or m.request.deadline is None:
                continue
            if now > m.request.deadline:
                late = now - m.request.deadline
                m.answer(
                    variant=m.variant,
                    model=worker.engine.model,
                    worker_id=worker.worker_id,
                    finish_reason="error",
                    error=ErrorInfo(
                        code="expired", message=f"deadline passed {late:.3f}s before the worker reached it"
                    ),
                )
