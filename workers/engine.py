"""The engine interface: a batch of requests in, one Completion per request out."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    def check(self, request: InferenceRequest) -> Rejection | None:
        """Cheap per-request admission check, run before the batch."""

    def generate(self, requests: list[InferenceRequest]) -> list[Completion]:
        """Run the batch; return one Completion per request, in order."""

    def close(self) -> None: ...


def make_engine(variant: VariantConfig, kind: str | None = None, model: str | None = None,
                extra_args: dict | None = None) -> Engine:
    """The engine a variant's config names, with --engine/--model/--engine-arg overrides applied."""
    kind = kind or variant.engine
    # The config's engine_args belong to the config's engine; another engine starts from none.
    args = {**(variant.engine_args if kind == variant.engine else {}), **(extra_args or {})}
    if kind == "echo":
        from workers.echo_engine import EchoEngine

        return EchoEngine(model=model or variant.model, **args)
    if kind == "vllm":
        from workers.vllm_engine import VllmEngine

        return VllmEngine(model=model or variant.model, engine_args=args)
    raise ConfigError(f"unknown engine {kind!r}; use 'echo' or 'vllm'")
