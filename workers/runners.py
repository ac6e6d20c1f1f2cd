"""Runners feed admitted messages to an engine and hand back finished ones, in whatever order the
engine finishes them. The worker loop never blocks on the engine: it polls, publishes and commits
while the engine works.

- StreamRunner (continuous batching): each request goes to the engine as soon as it is admitted;
  the engine (vLLM's AsyncLLM) schedules it into its running batch and calls back when it is done.
- BatchRunner (static batching): requests are grouped into batches of up to max_batch and run one
  batch at a time through a blocking `generate` (vLLM's `LLM.generate`), in a thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from workers.engine import Completion, TransientEngineError
from workers.message import Message

log = logging.getLogger(__name__)


class _Runner:
    def __init__(self) -> None:
        self._done: queue.Queue[Message] = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    def _finish(self, m: Message, completion: Completion) -> None:
        m.completion = completion
        with self._lock:
            self._inflight -= 1
        self._done.put(m)

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


class StreamRunner(_Runner):
    """Per-request submission to a continuous-batching engine; transient failures are retried."""

    def __init__(self, engine, attempts: int = 3, backoff_s: float = 0.5):
        super().__init__()
        self.engine = engine
        self.attempts, self.backoff_s = attempts, backoff_s

    def _start(self, messages: list[Message]) -> None:
        for m in messages:
            self._send(m, 1)

    def _send(self, m: Message, attempt: int) -> None:
        def done(completion: Completion | None, error: BaseException | None = None) -> None:
            if error is None:
                self._finish(m, completion)
            elif isinstance(error, TransientEngineError) and attempt < self.attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("engine: %s; retrying request %s in %.1fs", error, m.request.id, delay)
                timer = threading.Timer(delay, self._send, (m, attempt + 1))
                timer.daemon = True
                timer.start()
            else:
                log.error("engine failed request %s: %s", m.request.id, error)
                self._finish(m, Completion.failed(str(error) or type(error).__name__))

        try:
            self.engine.submit(m.request, done)
        except Exception as e:  # an engine that refuses at submit time fails this request only
            done(None, e)


class BatchRunner(_Runner):
    """Static batches through a blocking engine call (already wrapped by the middleware)."""

    def __init__(self, call, max_batch: int, max_wait_ms: int):
        super().__init__()
        self.call, self.max_batch, self.max_wait_s = call, max_batch, max_wait_ms / 1000
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
            try:
                completions = self.call([m.request for m in batch])
            except Exception as e:  # Retries turns engine failures into completions; this is a last resort
                completions = [Completion.failed(f"{type(e).__name__}: {e}")] * len(batch)
            for m, c in zip(batch, completions, strict=True):
                self._finish(m, c)

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=5)
