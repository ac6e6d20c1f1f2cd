"""Cross-cutting worker concerns, each in its own module, over one small hook interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.message import Message
    from workers.worker import Worker

EngineCall = Callable[[list], list]


class Middleware:
    """Hooks a worker calls, in middleware order. Every hook is optional."""

    def on_start(self, worker: "Worker") -> None: ...

    def before_batch(self, worker: "Worker", batch: list["Message"]) -> None:
        """Decide messages that must not reach the engine (dead-letter, expire); runs on the
        messages admitted together, just before they go to the engine."""

    def wrap_engine(self, worker: "Worker", call: EngineCall) -> EngineCall:
        """Wrap the blocking batch call of a static-batching engine."""
        return call

    def after_batch(self, worker: "Worker", batch: list["Message"]) -> None:
        """Runs on messages whose responses are safe in Kafka (and whose offsets are committed,
        or held below an unanswered one)."""

    def on_stop(self, worker: "Worker") -> None: ...


def default_middleware(**kw) -> list[Middleware]:
    from workers.middleware.deadline import Deadline
    from workers.middleware.draining import Draining
    from workers.middleware.engine_check import EngineCheck
    from workers.middleware.metrics import Metrics
    from workers.middleware.retries import Retries
    from workers.middleware.validation import Validation

    return [
        Draining(),
        Metrics(),
        Validation(),
        Deadline(),
        EngineCheck(),
        Retries(attempts=kw.get("engine_attempts", 3)),
    ]
