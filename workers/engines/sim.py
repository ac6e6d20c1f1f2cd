"""A GPU-shaped engine for benchmarks: vLLM's continuous batching with a step-time model, and no compute.

It answers the question a queue in front of a GPU must answer, on a machine without one: does the
queue keep a 256-slot engine full? Like vLLM's scheduler, every step moves each running request one
token forward and prefills the prompts admitted at that step, up to `max_num_seqs` running requests
and a KV-cache budget in tokens; a request that does not fit waits in the engine. A step takes

    base_ms + per_seq_ms * running + prefill_ms_per_token * prompt tokens prefilled in it

Defaults: Llama-3.1-8B in bf16 on one H100 under vLLM.
- base_ms, per_seq_ms: fit to the queue-fed sweep in llm-d-async issue #261 (one H100, ~256-token
  outputs): 4.2 req/s at 8 in flight, 35.8 at 128, 40.4 at 192. A request of 256 steps at
  concurrency c takes c / rate seconds, so a step takes 7.44 ms at 8 running, 13.97 ms at 128 and
  18.56 ms at 192; the line through the two ends is 6.96 ms + 0.0604 ms per running request (14.7 ms
  at 128, 5% above the middle point).
- prefill_ms_per_token: 8B parameters x 2 FLOPs a token at about half of the H100's 990 dense bf16
  TFLOP/s: ~31,000 prompt tokens/s, 0.032 ms a token; 0.035 with attention.
- kv_tokens: Llama-3.1-8B keeps 128 KiB of KV cache a token (32 layers x 8 KV heads x 128 dims x
  K and V x 2 bytes); 80 GB at gpu_memory_utilization 0.9, less 16 GB of weights, leaves ~56 GB:
  ~427,000 tokens. A request reserves its prompt and max_tokens when admitted (vLLM allocates as it
  goes, and preempts when it runs out; reserving never preempts).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from schemas import ConfigError, InferenceRequest
from schemas.answers import embedding_body
from schemas.body import EMBEDDINGS, GENERATE
from workers.engines.base import Completion, Rejection
from workers.engines.echo import echo_vector

# What a body without max_tokens generates here (vLLM would run to the end of the context).
DEFAULT_OUTPUT_TOKENS = 256


@dataclass
class _Running:
    request: InferenceRequest
    done: object
    prompt_tokens: int
    out_tokens: int  # per sample; an embedding's one step is its prefill
    n: int
    left: int = 0  # tokens still to generate
    first_token_at: float | None = None

    @classmethod
    def of(cls, request: InferenceRequest, done=None) -> _Running:
        asks = request.asks()
        prompt = max(1, sum(len(t.split()) for t in asks.texts))
        out = 1 if not asks.generates else asks.max_tokens or DEFAULT_OUTPUT_TOKENS
        return cls(request, done, prompt, out, asks.n, left=out)

    @property
    def kv_need(self) -> int:
        return self.prompt_tokens + self.out_tokens * self.n


class SimEngine:
    batching = "continuous"

    def __init__(
        self,
        model: str = "sim-llama-3.1-8b-h100",
        max_num_seqs: int = 256,
        kv_tokens: int = 427_000,
        base_ms: float = 6.96,
        per_seq_ms: float = 0.0604,
        prefill_ms_per_token: float = 0.035,
        **unknown,
    ):
        if unknown:
            raise ConfigError(
                f"sim engine does not take {', '.join(sorted(unknown))}; it takes max_num_seqs, kv_tokens, "
                "base_ms, per_seq_ms, prefill_ms_per_token"
            )
        if max_num_seqs < 1 or kv_tokens < 1:
            raise ConfigError("sim engine: max_num_seqs and kv_tokens must be at least 1")
        self.model = model
        self.max_num_seqs, self.kv_tokens = max_num_seqs, kv_tokens
        self.base_s, self.per_seq_s, self.prefill_s = base_ms / 1000, per_seq_ms / 1000, prefill_ms_per_token / 1000
        self._waiting: collections.deque[_Running] = collections.deque()
        self._running: list[_Running] = []
        self._kv_used = 0
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0
        self.busy_s = 0.0  # time spent in steps: the engine's utilisation is busy_s over the wall time
        self._thread = threading.Thread(target=self._loop, name="abq-sim-engine", daemon=True)
        self._thread.start()

    def check(self, request: InferenceRequest) -> Rejection | None:
        if request.endpoint not in (None, *GENERATE, EMBEDDINGS):
            return Rejection("unsupported", f"the sim engine does not serve {request.endpoint}; vLLM does")
        need = _Running.of(request).kv_need
        if need > self.kv_tokens:
            return Rejection("oversized_prompt", f"{need} tokens exceed the sim engine's KV budget of {self.kv_tokens}")
        return None

    def warm_up(self) -> None:
        pass

    def submit(self, request: InferenceRequest, done) -> None:
        with self._wake:
            self._waiting.append(_Running.of(request, done))
            self._wake.notify()

    def _admit(self) -> int:
        """Move waiting requests into the running batch while slots and KV budget allow; their
        prompt tokens, prefilled in this step."""
        prefill = 0
        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting[0]
            need = r.kv_need
            if self._kv_used + need > self.kv_tokens:
                break
            self._waiting.popleft()
            self._kv_used += need
            self._running.append(r)
            prefill += r.prompt_tokens
        return prefill

    def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                    next_at = time.monotonic()
                if self._closed:
                    return
                prefill = self._admit()
                step = self.base_s + self.per_seq_s * len(self._running) + self.prefill_s * prefill
            # The step "runs" while the lock is free, so submissions never wait for it.
            next_at += step
            time.sleep(max(0.0, next_at - time.monotonic()))
            now = time.time()
            finished = []
            with self._wake:
                self.steps += 1
                self.busy_s += step
                for r in self._running:
                    r.first_token_at = r.first_token_at or now
                    r.left -= 1
                    if r.left <= 0:
                        finished.append(r)
                if finished:
                    self._running = [r for r in self._running if r.left > 0]
                    for r in finished:
                        self._kv_used -= r.kv_need
            for r in finished:
                r.done(self._completion(r))  # type: ignore[operator]

    def _completion(self, r: _Running) -> Completion:
        if r.request.endpoint == EMBEDDINGS:
            vectors = [echo_vector(t) for t in r.request.asks().texts]
            body = embedding_body(r.request.id, self.model, vectors, r.prompt_tokens)
            return Completion(
                finish_reason="stop", prompt_tokens=r.prompt_tokens, first_token_at=r.first_token_at, body=body
            )
        n = r.out_tokens
        return Completion(
            outputs=[f"<{n} simulated tokens>"] * r.n,
            finish_reason="length",
            prompt_tokens=r.prompt_tokens,
            completion_tokens=n * r.n,
            first_token_at=r.first_token_at,
        )

    def stats(self) -> dict[str, float]:
        """What vLLM's scheduler reports: running and waiting requests, KV-cache usage (0..1), and
        the most it runs at once (max_num_seqs)."""
        with self._wake:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "kv_cache_usage": self._kv_used / self.kv_tokens,
                "capacity": self.max_num_seqs,
            }

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)
