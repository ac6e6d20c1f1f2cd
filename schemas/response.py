"""InferenceResponse: what a worker publishes for every request it consumed."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.body import GENERATE, answer_texts

FinishReason = Literal["stop", "length", "abort", "error"]

# Error codes a caller can act on; `message` carries the detail. `too_large`: the response would not
# fit the responses topic's max.message.bytes (lower n or max_tokens). `invalid_request`: the request was
# dead-lettered (the message starts with the dead letter's reason). `cancelled`: its caller cancelled it.
ErrorCode = Literal["expired", "engine_error", "invalid_request", "too_large", "internal", "cancelled"]


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    prompt_chars: int | None = Field(
        default=None,
        ge=0,
        description="the prompt's length in characters: the same whichever variant serves it (tokens depend on "
        "the model's tokenizer), so analysis can use it as a pre-treatment covariate",
    )


class TopLogprob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """One output token's log probability, and the most likely tokens at its position (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Timings(BaseModel):
    """Unix times in seconds along the request's path. `first_token` only where the engine knows it."""

    model_config = ConfigDict(extra="forbid")

    enqueued: float = Field(description="the request's Kafka record timestamp")
    dequeued: float = Field(description="when the worker polled the record")
    started: float | None = Field(default=None, description="when the engine started the batch")
    first_token: float | None = None
    finished: float
    ttft_s: float | None = Field(default=None, description="time to first token: engine start to first token")
    tpot_s: float | None = Field(default=None, description="time per output token after the first, per sample")


def unit_of(experiment: str, routing_key: str) -> str:
    """A response's `unit`: the routing key hashed with the experiment's name as salt, so the same user
    is not linkable across experiments and the key itself is not copied into responses."""
    return hashlib.sha256(f"{experiment}\x00unit\x00{routing_key}".encode()).hexdigest()[:16]


class InferenceResponse(BaseModel):
    """The outcome of one request: outputs, or an error instead of them."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    request_id: str
    experiment: str
    variant: str
    assigned_by: str | None = Field(
        default=None, description="copied from the request: weights, override:<name>, pinned"
    )
    config_version: int | None = Field(default=None, description="copied from the request")
    unit: str | None = Field(
        default=None,
        description="a hash of the request's routing key (the unit of assignment, not the key itself): the "
        "sample-ratio check counts units, so one busy user cannot look like a broken split",
    )
    model: str
    endpoint: str | None = Field(default=None, description="copied from a request with a body")
    body: dict[str, Any] | None = Field(
        default=None,
        description="for a request with a body: the OpenAI response body as the engine made it (ChatCompletion, "
        "Completion, CreateEmbeddingResponse, ...)",
    )
    outputs: list[str] = Field(
        default_factory=list, description="for a request without a body: one text per requested sample (n)"
    )
    finish_reason: FinishReason | None = None
    logprobs: list[list[TokenLogprob]] | None = Field(
        default=None, description="where the request asked for logprobs: per output (as outputs), one entry per token"
    )
    usage: Usage = Field(default_factory=Usage)
    timings: Timings
    worker_id: str
    error: ErrorInfo | None = None
    caller_tag: str | None = Field(default=None, description="copied from the request")
    reply_error: str | None = Field(
        default=None, description="why the request's reply_to did not get a copy; this response is the only one"
    )

    @model_validator(mode="after")
    def _outputs_or_error(self) -> InferenceResponse:
        if self.error is not None and (self.outputs or self.body is not None):
            raise ValueError("a failed response carries no outputs")
        return self

    def mean_logprob(self) -> float | None:
        """The mean log probability of the output tokens: a confidence signal (None without logprobs)."""
        values = [t.logprob for sample in self.logprobs or () for t in sample]
        return sum(values) / len(values) if values else None

    def texts(self) -> list[str]:
        """The generated texts, one per sample, whichever shape the answer has (none for embeddings)."""
        if self.body is not None and self.endpoint is not None:
            return answer_texts(self.endpoint, self.body) if self.endpoint in GENERATE else []
        return list(self.outputs)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def counts_for_variant(self) -> bool:
        """False for an `invalid_request` answer (the caller's input was refused before any engine
        saw it) and a `cancelled` one (its caller went away): neither says anything about the
        variant; analysis and rollouts leave these out (reports count cancels apart)."""
        return self.error is None or self.error.code not in ("invalid_request", "cancelled")
