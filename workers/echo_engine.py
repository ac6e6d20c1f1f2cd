"""EchoEngine: deterministic, instant, no model. For pipeline tests, demos and queueing benchmarks."""

from __future__ import annotations

import hashlib
import time

from schemas import ConfigError, InferenceRequest
from workers.engine import Completion, Rejection, TransientEngineError


def _fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


class EchoEngine:
    """Answers each request with its own prompt (or last message), cut to max_tokens words.

    Knobs (engine_args in the experiment config), to rehearse failure handling without a GPU:
      latency_ms        time each batch takes
      error_rate        share of requests (chosen by id, so stable) answered with an engine error
      transient_failures  the first N batches raise a transient error (exercises retries)
    """

    def __init__(self, model: str = "echo", latency_ms: float = 0.0, error_rate: float = 0.0, transient_failures: int = 0, **unknown):
        if unknown:
            raise ConfigError(f"echo engine does not take {', '.join(sorted(unknown))}; it takes latency_ms, error_rate, transient_failures")
        if not 0.0 <= error_rate <= 1.0:
            raise ConfigError(f"echo engine error_rate {error_rate} is outside [0, 1]")
        self.model = model
        self.latency_s = latency_ms / 1000
        self.error_rate = error_rate
        self._transient_left = transient_failures

    def check(self, request: InferenceRequest) -> Rejection | None:
        return None

    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        if self._transient_left > 0:
            self._transient_left -= 1
            raise TransientEngineError("echo engine: rehearsed transient failure")
        if self.latency_s:
            time.sleep(self.latency_s)
        first = time.time()
        out = []
        for r in requests:
            if self.error_rate and _fraction(r.id) < self.error_rate:
                out.append(Completion.failed("echo engine: rehearsed failure (error_rate)"))
                continue
            text = r.prompt if r.prompt is not None else r.messages[-1].content
            words = text.split()
            kept = words[: r.max_tokens]
            out.append(
                Completion(
                    outputs=[" ".join(kept)] * r.n,
                    finish_reason="length" if len(words) > r.max_tokens else "stop",
                    prompt_tokens=len(words),
                    completion_tokens=len(kept) * r.n,
                    first_token_at=first,
                )
            )
        return out

    def close(self) -> None:
        pass
