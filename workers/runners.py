"""Runners feed admitted messages to the engine and hand back finished ones, in whatever order the
engine finishes them. The worker loop never blocks on the engine: it polls, publishes and commits
while the engine works.

Both kinds of engine are called through one shape, `EngineCall`: a list of requests and a `done(i,
result)` called once per request, from any thread. `engine_call` is the one place an engine is
called; middleware wraps that call (retries, the batch-size metric) the same way for both kinds.

- StreamRunner (continuous batching): each admitted group goes to the engine at once; the engine
  (vLLM's AsyncLLM) schedules every request into its running batch and calls back as each is done.
- BatchRunner (static batching): requests are grouped into batches of up to max_batch and run one
  batch at a time through a blocking `generate` (vLLM's `LLM.generate`), in a thread.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import cast

from schemas import InferenceRequest
from workers.engines.base import Completion, Engine, EngineDead, EngineError, Refused, Result
from workers.message import Message

log = logging.getLogger(__name__)

Done = Callable[[int, Result], None]
EngineCall = Callable[[list[InferenceRequest], Done], None]


def engine_call(engine: Engine) -> EngineCall:
    """The engine as an EngineCall. A static engine runs the whole list as one batch in the caller's
    thread (serialised: vLLM's LLM is not thread-safe, and a retry may come from a timer thread); a
    streaming engine gets each request submitted and answers as each finishes."""
    if engine.batching == "static":
        lock = threading.Lock()

        def call_static(requests: list[InferenceRequest], done: Done) -> None:
            results: list[Result]
            try:
                with lock:
                    results = list(engine.generate(requests))  # type: ignore[union-attr]
                if len(results) != len(requests):
                    raise EngineError(f"engine returned {len(results)} results for {len(requests)} requests")
            except Exception as e:  # one error, shared by the batch: middleware may split it
                results = [e] * len(requests)
            for i, result in enumerate(results):  # outside the lock: a callback may call the engine again
                done(i, result)

        return call_static

    def call_streaming(requests: list[InferenceRequest], done: Done) -> None:
        for i, request in enumerate(requests):
            try:
                engine.submit(request, functools.partial(done, i))  # type: ignore[union-attr]
            except Exception as e:  # an engine that refuses at submit time fails this request only
                done(i, e)

    return call_streaming


class Runner:
    def __init__(self, call: EngineCall) -> None:
        self.call = call
        self._done: queue.Queue[Message] = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    def _finish(self, m: Message, result: Result) -> None:
        if isinstance(result, EngineDead):
            m.engine_dead = result  # not the request's fault: it gets no answer, a healthy replica serves it
        elif isinstance(result, Refused):
            m.completion = Completion(finish_reason="error", refused=result.rejection)
        elif isinstance(result, BaseException):
            log.error("engine failed request %s: %s", m.request.id if m.request else "?", result)
            m.completion = Completion.failed(str(result) or type(result).__name__)
        else:
            m.completion = result
        with self._lock:
            self._inflight -= 1
        self._done.put(m)

    def _run(self, messages: list[Message]) -> None:
        """One engine call; each message is finished exactly once, whatever the call or its
        middleware does (a callback twice, or an exception before some requests were answered)."""
        answered = [False] * len(messages)
        lock = threading.Lock()

        def done(i: int, result: Result) -> None:
            with lock:
                if answered[i]:
                    log.warning(
                        "engine answered the request at offset %d twice; the second answer is ignored",
                        messages[i].record.offset,
                    )
                    return
                answered[i] = True
            self._finish(messages[i], result)

        try:
            self.call(cast(list[InferenceRequest], [m.request for m in messages]), done)
        except Exception as e:  # a middleware wrapper that raises must not leave requests in flight forever
            log.exception("engine call raised; failing its unanswered requests")
            for i in range(len(messages)):
                if not answered[i]:
                    done(i, e)

    def take(self, timeout: float) -> list[Message]:
        """Finished messages: waits up to `timeout` for the first, then takes all that are there."""
        try:
            out = [self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def submit(self, messages: list[Message]) -> None:
        with self._lock:
            self._inflight += len(messages)
        now = time.time()
        for m in messages:
            m.started = now
        self._start(messages)

    def _start(self, messages: list[Message]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StreamRunner(Runner):
    """Each admitted group goes to a continuous-batching engine at once."""

    def _start(self, messages: list[Message]) -> None:
        self._run(messages)


class BatchRunner(Runner):
    """Static batches through a blocking engine call, one batch at a time, in a thread."""

    def __init__(self, call: EngineCall, max_batch: int, max_wait_ms: int):
        super().__init__(call)
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000
        self._todo: queue.Queue[Message | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="abq-engine", daemon=True)
        self._thread.start()

    def _start(self, messages: list[Message]) -> None:
        for m in messages:
            self._todo.put(m)

    def _next_batch(self) -> list[Message] | None:
        first = self._todo.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                left = deadline - time.monotonic()
                m = self._todo.get(timeout=left) if left > 0 else self._todo.get_nowait()
            except queue.Empty:
                break
            if m is None:
                self._todo.put(None)
                break
            batch.append(m)
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.time()
            for m in batch:
                m.started = started
            self._run(batch)

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=5)


def make_runner(engine: Engine, call: EngineCall, max_batch: int, max_wait_ms: int) -> Runner:
    if engine.batching == "static":
        return BatchRunner(call, max_batch, max_wait_ms)
    return StreamRunner(call)
