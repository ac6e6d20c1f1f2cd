"""What every engine shares, and the two shapes an engine can have.

A static-batching engine (`StaticEngine`) runs a batch and returns one Completion per request; a
continuous-batching engine (`StreamingEngine`) takes requests one by one and calls back as each
finishes. The worker never calls either directly: `workers.runners.engine_call` turns both into one
call shape that middleware wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from schemas import ErrorInfo, InferenceRequest
from schemas.deadletter import DeadLetterReason
from schemas.response import FinishReason, TokenLogprob


class EngineError(RuntimeError):
    """The engine failed on this input; retrying the same input will fail again."""


class TransientEngineError(EngineError):
    """The engine failed for a passing reason (out of memory under load, a restart); retry."""


class EngineDead(EngineError):
    """The engine itself is gone (vLLM's EngineDeadError): every later request would fail too. The
    worker stops instead of answering its backlog with errors; a healthy replica serves it."""


class Refused(EngineError):
    """A request refused on its way to or from the engine (a hook that failed, a hooked prompt the
    engine cannot take): dead-lettered with `rejection`, its caller answered with invalid_request."""

    def __init__(self, rejection: Rejection):
        super().__init__(rejection.detail)
        self.rejection = rejection


@dataclass
class Completion:
    outputs: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # Unix time, where the engine reports it
    error: ErrorInfo | None = None
    logprobs: list[list[TokenLogprob]] | None = None  # per output, where the request asked for them
    refused: Rejection | None = None  # Refused: the worker dead-letters the request instead of answering it
    body: dict | None = None  # the OpenAI response body, where the engine made one (vLLM's serving layer)
    ttft_s: float | None = None  # where the engine measured them (vLLM's per-request metrics)
    tpot_s: float | None = None

    @classmethod
    def failed(cls, message: str) -> Completion:
        return cls(finish_reason="error", error=ErrorInfo(code="engine_error", message=message[:1000]))


@dataclass
class Rejection:
    """A request the engine cannot take (e.g. longer than the model's context): it is dead-lettered."""

    reason: DeadLetterReason
    detail: str


Result = Completion | BaseException
"""What an engine makes of one request: a completion, or the error it failed with."""


class EngineBase(Protocol):
    model: str
    batching: str  # "continuous" (a StreamingEngine) or "static" (a StaticEngine)

    def check(self, request: InferenceRequest) -> Rejection | None:
        """Cheap per-request admission check, run just before the request goes to the engine."""

    def warm_up(self) -> None:
        """Answer one request, so the worker turns ready only with an engine that works."""

    def close(self) -> None: ...


@runtime_checkable
class StaticEngine(EngineBase, Protocol):
    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        """Run the batch (blocking); one Completion per request, in order."""


@runtime_checkable
class StreamingEngine(EngineBase, Protocol):
    def submit(self, request: InferenceRequest, done: Callable[[Result], None]) -> None:
        """Start the request and return; later call done(completion) or done(error), from any thread."""


Engine = StaticEngine | StreamingEngine
