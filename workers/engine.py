"""The engine interface. A static-batching engine runs a batch and returns one Completion per request;
a continuous-batching engine takes requests one by one and calls back as each finishes."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Protocol

from schemas import ConfigError, ErrorInfo, InferenceRequest, VariantConfig


class EngineError(RuntimeError):
    """The engine failed on this input; retrying the same input will fail again."""


class TransientEngineError(EngineError):
    """The engine failed for a passing reason (out of memory under load, a restart); retry."""


@dataclass
class Completion:
    outputs: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # Unix time, where the engine reports it
    error: ErrorInfo | None = None

    @classmethod
    def failed(cls, message: str) -> "Completion":
        return cls(finish_reason="error", error=ErrorInfo(code="engine_error", message=message[:1000]))


@dataclass
class Rejection:
    """A request the engine cannot take (e.g. longer than the model's context): it is dead-lettered."""

    reason: str
    detail: str


class Engine(Protocol):
    model: str
    batching: str  # "continuous": submit() is used; "static": generate() is

    def check(self, request: InferenceRequest) -> Rejection | None:
        """Cheap per-request admission check, run just before the request goes to the engine."""

    def warm_up(self) -> None:
        """Answer one request, so the worker turns ready only with an engine that works."""

    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        """Static batching: run the batch; return one Completion per request, in order."""

    def submit(self, request: InferenceRequest, done: Callable[..., None]) -> None:
        """Continuous batching: start the request; later call done(completion) or done(None, error)."""

    def close(self) -> None: ...


def make_engine(variant: VariantConfig, kind: str | None = None, model: str | None = None,
                extra_args: dict | None = None) -> Engine:
    """The engine a variant's config names, with --engine/--model/--engine-arg overrides applied."""
    kind = kind or variant.engine
    same = kind == variant.engine
    # The config's engine settings belong to the config's engine; another engine starts from none.
    args = {**(variant.engine_args if same else {}), **(extra_args or {})}
    if kind == "echo":
        from workers.echo_engine import EchoEngine

        return EchoEngine(model=model or variant.model, **args)
    if kind in ("vllm", "vllm-batch"):
        from workers.vllm_async_engine import AsyncVllmEngine
        from workers.vllm_engine import VllmEngine

        args = {**(variant.vllm.args() if variant.engine.startswith("vllm") else {}), **args}
        cls = AsyncVllmEngine if kind == "vllm" else VllmEngine
        return cls(model=model or variant.model, engine_args=args)
    raise ConfigError(f"unknown engine {kind!r}; use 'echo', 'vllm' or 'vllm-batch'")
