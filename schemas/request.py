"""InferenceRequest: what a service asks of a model variant."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from schemas.body import CHAT, COMPLETIONS, Asks, BodyError, Endpoint, body_asks

# Bounds that protect the engine: a request outside them is dead-lettered by the worker rather than
# handed to vLLM, where a bad value can fail a whole batch.
MAX_N = 16
MAX_STOP_SEQUENCES = 8
MAX_TOKENS_LIMIT = 1_000_000
MAX_TOP_LOGPROBS = 20  # OpenAI's bound; a variant's max_top_logprobs may be lower

# Priority levels, highest first. Each has its own topic per variant; bulk jobs use the lowest.
PRIORITIES = ("high", "normal", "batch")
Priority = Literal["high", "normal", "batch"]


def new_request_id() -> str:
    return uuid.uuid4().hex


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class InferenceRequest(BaseModel):
    """One inference request: an OpenAI `body` for an `endpoint`, as the caller wrote it, inside
    abqueue's envelope. Requests from producers older than `body` carry `prompt` or `messages` and the
    sampling fields instead, and are served as they always were: exactly one of `body`, `prompt` or
    `messages` is set. What abqueue reads from either shape, it reads through `asks()`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    id: str = Field(default_factory=new_request_id, min_length=1, max_length=256)
    experiment: str = Field(min_length=1, max_length=100)
    routing_key: str = Field(min_length=1, max_length=512, description="user or session key; sticky")
    variant: str | None = Field(default=None, description="set by the producer from the assignment")
    assigned_by: str | None = Field(
        default=None, max_length=100, description="weights, override:<name> or pinned; set by the producer"
    )
    config_version: int | None = Field(
        default=None,
        ge=1,
        description="the live config version whose weights assigned it (set by a producer that follows the live "
        "config); the sample-ratio check compares each version's traffic with its own weights",
    )
    endpoint: Endpoint | None = Field(
        default=None, description="the OpenAI endpoint the body is for (with body): /v1/chat/completions, ..."
    )
    body: dict[str, Any] | None = Field(
        default=None,
        description="the OpenAI request body as the caller wrote it (any field the variant's engine serves); "
        "its model is replaced by the variant's served model",
    )
    prompt: str | None = Field(default=None, description="without body: the prompt of a completion")
    messages: list[ChatMessage] | None = Field(default=None, description="without body: the messages of a chat")
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    # None, not False, when unset: encode() leaves it out, so workers older than the field still take the request.
    logprobs: bool | None = Field(default=None, description="true: return each output token's log probability")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="with logprobs: also the most likely tokens at each position, this many (the variant's "
        "max_top_logprobs bounds it)",
    )
    deadline: float | None = Field(default=None, description="absolute Unix time in seconds")
    reply_to: str | None = Field(default=None, max_length=249, description="extra topic for the response")
    caller_tag: str | None = Field(
        default=None,
        max_length=64,
        description="set by the client that waits for the answer and copied to the response, so that a client "
        "takes only answers meant for it even where another caller uses the same ids",
    )
    priority: Priority = Field(default="normal", description="high, normal or batch; higher levels are served first")
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time, description="Unix time in seconds")
    # Never on the wire: where a worker's engine puts this request's chunks as it makes them (the
    # worker's stream for a request with stream: true). model_copy keeps it, so a request the
    # treatment or a hook changed still streams.
    _chunks: Any = PrivateAttr(default=None)

    def stream_to(self, sink: Any) -> None:
        self._chunks = sink

    def chunk_sink(self) -> Any:
        """The worker's stream of this request (put(chunk), restart()), or None: answer it whole."""
        return self._chunks

    @model_validator(mode="after")
    def _one_input(self) -> InferenceRequest:
        if (self.body is None) != (self.endpoint is None):
            raise ValueError("'endpoint' and 'body' go together")
        if sum(x is not None for x in (self.body, self.prompt, self.messages)) != 1:
            raise ValueError("exactly one of 'body', 'prompt' or 'messages' must be set")
        if self.body is not None:
            try:
                asks = self.asks()
            except BodyError as e:
                raise ValueError(f"body: {e}") from None
            if asks.n > MAX_N:
                raise ValueError(f"body: n must be at most {MAX_N}")
            if asks.max_tokens is not None and asks.max_tokens > MAX_TOKENS_LIMIT:
                raise ValueError(f"body: max_tokens must be at most {MAX_TOKENS_LIMIT}")
            return self
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'logprobs' must be true when 'top_logprobs' is set")
        if any(not s for s in self.stop):
            raise ValueError("'stop' sequences must not be empty strings")
        return self

    def asks(self) -> Asks:
        """What the request asks for, read from its body or from the fields of a request without one."""
        if self.body is not None:
            assert self.endpoint is not None
            return body_asks(self.endpoint, self.body)
        texts = (self.prompt,) if self.prompt is not None else tuple(m.content for m in self.messages or ())
        endpoint = COMPLETIONS if self.prompt is not None else CHAT
        return Asks(endpoint, self.max_tokens, self.n, bool(self.logprobs), self.top_logprobs, texts)

    def prompt_chars(self) -> int:
        return self.asks().prompt_chars
