"""Cancelling: a caller's cancel (AbqClient.cancel, or a gateway client that went away) stops its
request wherever this worker has it. A request still buffered is answered `cancelled` and never
reaches the engine; one with the engine is aborted there (vLLM frees its slot) and answered
`cancelled` at once. A cancel names the request's caller tag, and only a request with that same tag is
touched: nobody cancels what another caller sent, even with the same id. A cancel for a request this
worker has not met yet is remembered (bounded) for when it does; one for a request already answered
does nothing but count as too late."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from schemas import ErrorInfo
from schemas.stream import Cancel
from workers.calls import CallAnswers
from workers.engines.base import Completion
from workers.middleware import Middleware
from workers.runners import Done, EngineCall

log = logging.getLogger(__name__)

REMEMBERED = 100_000  # cancels not matched yet, and requests answered lately (each an id and a tag)
REMEMBER_S = 3600.0  # the cancel topic's retention: a cancel older than that is forgotten
CATCH_UP_S = 15.0  # the longest the first batch waits for the cancels sent before the worker started

Key = tuple[str, str | None]


def cancelled_completion(stage: str) -> Completion:
    return Completion(
        finish_reason="error", error=ErrorInfo(code="cancelled", message=f"cancelled by its caller ({stage})")
    )


class Cancelling(Middleware):
    def __init__(self, start_reader: Callable[[Callable[[Cancel], None]], Any] | None = None):
        """start_reader(on_cancel): starts reading the cancel topic and returns what to close()
        (workers.cancels.CancelReader); without it, cancels come only through cancel(). Where what it
        returns has a `caught_up` event, no request reaches the engine before it is set (or
        CATCH_UP_S passed): a cancel sent while no worker ran must be read before its request is."""
        self._start_reader, self._reader = start_reader, None
        self._caught_up: threading.Event | None = None
        self._lock = threading.Lock()
        self._asked: OrderedDict[Key, float] = OrderedDict()  # cancels that matched nothing yet
        self._answered: OrderedDict[Key, None] = OrderedDict()  # lately answered: a cancel is too late
        self._running: dict[Key, list[tuple[CallAnswers, int, Any]]] = {}  # with the engine now
        self._worker: Any = None

    def before_start(self, worker) -> None:
        self._worker = worker
        self.cancels = Counter(
            "abq_cancels", "Cancels acted on, by where the request was: queued (never ran), engine (aborted "
            "there), too_late (already answered)", ("experiment", "variant", "stage"), registry=worker.registry,
        )  # fmt: skip
        if self._start_reader is not None:
            self._reader = self._start_reader(self.cancel)
            self._caught_up = getattr(self._reader, "caught_up", None)

    def after_stop(self, worker) -> None:
        if self._reader is not None:
            self._reader.close()

    def cancel(self, c: Cancel) -> None:
        key = (c.request_id, c.caller_tag)
        with self._lock:
            running = self._running.pop(key, [])
            if not running:
                if key in self._answered:
                    self._count(None, "too_late")
                else:
                    self._remember(self._asked, key, c.at)
                return
        engine_abort = getattr(self._worker.engine, "abort", None)
        for answers, i, request in running:
            if engine_abort is not None:
                try:
                    engine_abort(request)
                except Exception:
                    log.exception("could not abort request %s in the engine", request.id)
            if answers.answer(i, cancelled_completion("aborted in the engine")):
                self._count(request.variant, "engine")
                log.info("request %s cancelled by its caller; aborted in the engine", request.id)

    def before_batch(self, worker, batch) -> None:
        if self._caught_up is not None:
            # Once, on the first batch: the reader had the engine's warm-up to catch up in.
            if not self._caught_up.wait(CATCH_UP_S):
                log.warning(
                    "the cancel topic was not read up to its end within %gs; serving, and acting on cancels as "
                    "they are read", CATCH_UP_S,
                )  # fmt: skip
            self._caught_up = None
        with self._lock:
            now = time.time()
            while self._asked and next(iter(self._asked.values())) < now - REMEMBER_S:
                self._asked.popitem(last=False)
            asked = [m for m in batch if not m.done and m.request and self._asked.pop(_key(m.request), None)]
        for m in asked:
            completion = cancelled_completion("before it ran")
            m.answer(
                variant=m.variant, model=worker.engine.model, worker_id=worker.worker_id,
                finish_reason="error", error=completion.error,
            )  # fmt: skip
            self._count(m.variant, "queued")

    def wrap_engine(self, worker, call: EngineCall) -> EngineCall:
        def cancellable(requests, done: Done) -> None:
            answers = CallAnswers(requests, done)
            keys = [_key(r) for r in requests]
            with self._lock:
                for i, (key, r) in enumerate(zip(keys, requests, strict=True)):
                    self._running.setdefault(key, []).append((answers, i, r))

            def finished(i: int, result) -> None:
                with self._lock:
                    held = self._running.get(keys[i], [])
                    held[:] = [h for h in held if h[0] is not answers or h[1] != i]
                    if not held:
                        self._running.pop(keys[i], None)
                answers.answer(i, result)

            call(requests, finished)

        return cancellable

    def after_batch(self, worker, batch) -> None:
        late = []
        with self._lock:
            for m in batch:
                if m.request is not None:
                    key = _key(m.request)
                    self._remember(self._answered, key, None)
                    if self._asked.pop(key, None) is not None:  # it came while the answer was on its way
                        late.append(m.variant)
        for variant in late:
            self._count(variant, "too_late")

    def _remember(self, where: OrderedDict, key: Key, value) -> None:
        where[key] = value
        where.move_to_end(key)
        while len(where) > REMEMBERED:
            where.popitem(last=False)

    def _count(self, variant: str | None, stage: str) -> None:
        worker = self._worker
        self.cancels.labels(worker.experiment.name, variant or worker.serves, stage).inc()


def _key(request) -> Key:
    return (request.id, request.caller_tag)
