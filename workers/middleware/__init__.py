"""Cross-cutting worker concerns, each in its own module, over one small hook interface.

Hooks are called through `emit_before` / `emit_after` (after dramatiq's Broker.emit_before and
emit_after): `before_*` hooks in middleware order, `after_*` hooks in reverse, and a hook that raises
is logged and skipped, so one faulty middleware never stops the worker. `wrap_engine` composes the
same way, the first middleware outermost.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.message import Message
    from workers.runners import EngineCall
    from workers.worker import Worker

log = logging.getLogger(__name__)


class Middleware:
    """Hooks a worker calls. Every hook is optional."""

    def before_start(self, worker: Worker) -> None: ...

    def before_batch(self, worker: Worker, batch: list[Message]) -> None:
        """Decide messages that must not reach the engine (dead-letter, expire); runs on the
        messages admitted together, just before they go to the engine."""

    def wrap_engine(self, worker: Worker, call: EngineCall) -> EngineCall:
        """Wrap the engine call (both kinds of engine: see workers.runners.EngineCall)."""
        return call

    def after_engine(self, worker: Worker, finished: list[Message]) -> None:
        """Runs on messages the engine has finished (their `completion` set), before their answers
        are made; a message decided here (rejected) is answered as decided."""

    def before_deliver(self, worker: Worker, ready: list[Message]) -> None:
        """Runs on answered and dead-lettered messages just before their records go to Kafka."""

    def after_batch(self, worker: Worker, batch: list[Message]) -> None:
        """Runs on messages whose responses are safe in Kafka (and whose offsets are committed,
        or held below an unanswered one)."""

    def after_stop(self, worker: Worker) -> None: ...


def emit_before(middleware: list[Middleware], hook: str, *args: Any) -> None:
    for mw in middleware:
        _call(mw, hook, args)


def emit_after(middleware: list[Middleware], hook: str, *args: Any) -> None:
    for mw in reversed(middleware):
        _call(mw, hook, args)


def _call(mw: Middleware, hook: str, args: tuple) -> None:
    try:
        getattr(mw, hook)(*args)
    except Exception:
        log.critical(
            "middleware %s failed in %s; carrying on without it for this call", type(mw).__name__, hook, exc_info=True
        )


def wrap_engine(middleware: list[Middleware], worker: Worker, call: EngineCall) -> EngineCall:
    for mw in reversed(middleware):  # the first middleware ends up outermost
        try:
            call = mw.wrap_engine(worker, call)
        except Exception:
            log.critical(
                "middleware %s failed to wrap the engine; running without it", type(mw).__name__, exc_info=True
            )
    return call


def default_middleware(engine_attempts: int = 3, request_timeout_s: float | None = 600.0) -> list[Middleware]:
    from workers.middleware.deadline import Deadline
    from workers.middleware.draining import Draining
    from workers.middleware.engine_check import EngineCheck
    from workers.middleware.engine_timeout import EngineTimeout
    from workers.middleware.metrics import Metrics
    from workers.middleware.retries import Retries
    from workers.middleware.validation import Validation

    return [
        Draining(),
        Metrics(),
        Validation(),
        Deadline(),
        EngineCheck(),
        EngineTimeout(request_timeout_s),  # outside Retries: the bound covers every attempt
        Retries(attempts=engine_attempts),
    ]
