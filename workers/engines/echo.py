"""EchoEngine: deterministic, instant, no model. For pipeline tests, demos and queueing benchmarks."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time

from schemas import ConfigError, InferenceRequest, chunks
from schemas.answers import embedding_body
from schemas.body import EMBEDDINGS, GENERATE, Asks
from schemas.response import TokenLogprob, TopLogprob
from workers.engines.base import Completion, EngineDead, Rejection, TransientEngineError


def _fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


class EchoEngine:
    """Answers each request with its own prompt (or last message), cut to max_tokens words; an
    embeddings request with a deterministic unit vector per input (ECHO_DIMENSIONS numbers, from a
    hash of the text: equal texts, equal vectors). Score and rerank need vLLM.

    Knobs (engine_args in the experiment config), to rehearse failure handling without a GPU:
      latency_ms          time to the first token (per batch with static batching)
      ms_per_token        time per output word after that, so longer answers finish later
      error_rate          share of requests (chosen by id, so stable) answered with an engine error
      transient_failures  the first N calls raise a transient error (exercises retries)
      dies_after          after N requests the engine is dead: every later call fails with EngineDead
      batching            continuous (default: each request finishes on its own time) or static
    """

    def __init__(
        self,
        model: str = "echo",
        latency_ms: float = 0.0,
        ms_per_token: float = 0.0,
        error_rate: float = 0.0,
        transient_failures: int = 0,
        dies_after: int | None = None,
        batching: str = "continuous",
        **unknown,
    ):
        if unknown:
            raise ConfigError(
                f"echo engine does not take {', '.join(sorted(unknown))}; it takes latency_ms, "
                "ms_per_token, error_rate, transient_failures, dies_after, batching"
            )
        if not 0.0 <= error_rate <= 1.0:
            raise ConfigError(f"echo engine error_rate {error_rate} is outside [0, 1]")
        if batching not in ("continuous", "static"):
            raise ConfigError(f"echo engine batching {batching!r} is not 'continuous' or 'static'")
        self.model = model
        self.batching = batching
        self.latency_s = latency_ms / 1000
        self.per_token_s = ms_per_token / 1000
        self.error_rate = error_rate
        self._transient_left = transient_failures
        self._lives_left = dies_after
        self._due: list = []  # heap of (due, seq, request, what to do then: put a chunk, or answer)
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._timer: threading.Thread | None = None

    def check(self, request: InferenceRequest) -> Rejection | None:
        if request.endpoint not in (None, *GENERATE, EMBEDDINGS):
            return Rejection("unsupported", f"the echo engine does not serve {request.endpoint}; vLLM does")
        return None

    def warm_up(self) -> None:
        pass

    def _dead(self, n: int) -> bool:
        """Counts n more requests against dies_after; True once the engine is dead."""
        if self._lives_left is None:
            return False
        if self._lives_left < n:
            self._lives_left = 0
            return True
        self._lives_left -= n
        return False

    def _transient(self) -> bool:
        if self._transient_left > 0:
            self._transient_left -= 1
            return True
        return False

    def _complete(self, r: InferenceRequest, first: float) -> Completion:
        if self.error_rate and _fraction(r.id) < self.error_rate:
            return Completion.failed("echo engine: rehearsed failure (error_rate)")
        asks = r.asks()
        if asks.endpoint == EMBEDDINGS:
            inputs = list(asks.texts)
            tokens = sum(len(t.split()) for t in inputs)
            vectors = [echo_vector(t) for t in inputs]
            return Completion(
                prompt_tokens=tokens, first_token_at=first, finish_reason="stop",
                body=embedding_body(r.id, self.model, vectors, tokens),
            )  # fmt: skip
        words = _text(asks).split()
        limit = asks.max_tokens if asks.max_tokens is not None else len(words)
        kept = words[:limit]
        sure = None
        if asks.logprobs:  # an echo is certain of every word it says: log probability 0, no other candidate
            top = asks.top_logprobs or 0
            sure = [
                TokenLogprob(token=w, logprob=0.0, top_logprobs=[TopLogprob(token=w, logprob=0.0)][:top]) for w in kept
            ]
        return Completion(
            outputs=[" ".join(kept)] * asks.n,
            finish_reason="length" if len(words) > limit else "stop",
            prompt_tokens=len(words),
            completion_tokens=len(kept) * asks.n,
            first_token_at=first,
            logprobs=[sure] * asks.n if sure is not None else None,
        )

    # static batching
    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        if self._dead(len(requests)):
            raise EngineDead("echo engine: rehearsed engine death (dies_after)")
        if self._transient():
            raise TransientEngineError("echo engine: rehearsed transient failure")
        if self.latency_s:
            time.sleep(self.latency_s)
        first = time.time()
        longest = max((_words_out(r) for r in requests), default=0)
        if self.per_token_s and longest:
            time.sleep(self.per_token_s * longest)
        return [self._complete(r, first) for r in requests]

    # continuous batching: every request finishes on its own schedule, in a timer thread
    def submit(self, request: InferenceRequest, done) -> None:
        if self._dead(1):
            done(EngineDead("echo engine: rehearsed engine death (dies_after)"))
            return
        if self._transient():
            done(TransientEngineError("echo engine: rehearsed transient failure"))
            return
        now = time.time()
        tokens = _words_out(request)
        first = now + self.latency_s
        events = [(first + self.per_token_s * tokens, lambda: done(self._complete(request, first)))]
        if (sink := request.chunk_sink()) is not None:
            sink.restart()
            events = [*_stream_events(request, self.model, first, self.per_token_s, sink), *events]
        with self._wake:
            if self._timer is None:
                self._timer = threading.Thread(target=self._fire, name="abq-echo", daemon=True)
                self._timer.start()
            for due, fire in events:  # the sequence number keeps a request's events in order at equal times
                heapq.heappush(self._due, (due, next(self._seq), request, fire))
            self._wake.notify()

    def _fire(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._due or self._due[0][0] > time.time()):
                    self._wake.wait(timeout=(self._due[0][0] - time.time()) if self._due else None)
                if self._closed:
                    return
                _, _, _, fire = heapq.heappop(self._due)
            fire()

    def abort(self, request: InferenceRequest) -> None:
        """Drop what is left of the request (its chunks to come, its answer); `done` is not called."""
        with self._wake:
            self._due = [e for e in self._due if e[2] is not request]
            heapq.heapify(self._due)

    def stats(self) -> dict[str, float]:
        return {"running": len(self._due)}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()


def _stream_events(request: InferenceRequest, model: str, first: float, per_token_s: float, sink) -> list:
    """(due, put one chunk) per word as the echo says it: the first at `first`, then one per
    per_token_s, every choice's word together; then each choice's finish and, where asked, the usage."""
    asks = request.asks()
    if asks.endpoint == EMBEDDINGS:
        return []
    words = _text(asks).split()
    limit = asks.max_tokens if asks.max_tokens is not None else len(words)
    kept, reason = words[:limit], "length" if len(words) > limit else "stop"
    created, ep = int(first), asks.endpoint
    events = []

    def put(choices: list[dict], usage: dict | None = None):
        return lambda: sink.put(chunks.chunk(ep, request.id, model, created, choices, usage))

    for i, word in enumerate(kept):
        text = word if i == 0 else f" {word}"
        events.append((first + per_token_s * i, put([chunks.delta(ep, c, text, first=i == 0) for c in range(asks.n)])))
    done_at = first + per_token_s * len(kept)
    events.append((done_at, put([chunks.delta(ep, c, "", reason, first=not kept) for c in range(asks.n)])))
    if asks.include_usage:
        usage = {"prompt_tokens": len(words), "completion_tokens": len(kept) * asks.n,
                 "total_tokens": len(words) + len(kept) * asks.n}  # fmt: skip
        events.append((done_at, lambda: sink.put(chunks.usage_chunk(ep, request.id, model, created, usage))))
    return events


def _text(asks: Asks) -> str:
    """What an echo says back: the prompt, or the last message's text."""
    return asks.texts[-1] if asks.texts else ""


def _words_out(r: InferenceRequest) -> int:
    asks = r.asks()
    if asks.endpoint == EMBEDDINGS:
        return 0
    words = len(_text(asks).split())
    return words if asks.max_tokens is None else min(words, asks.max_tokens)


ECHO_DIMENSIONS = 16


def echo_vector(text: str) -> list[float]:
    """A unit vector made from the text's hash: deterministic, so tests and demos can compare."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:ECHO_DIMENSIONS]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]
