"""The OpenAI request body a request carries, and the one typed reading of it abqueue needs.

abqueue does not re-model OpenAI's API: a request's `body` is what the caller wrote, and vLLM's
serving layer on the worker validates and serves it. What abqueue itself needs from a body (how many
tokens it may generate, for the variant's limit; the prompt's length, for the report's covariate;
`n` and logprobs, for its bounds; the prompt's text, for the echo engine and the hooks) is read here,
once, by `asks()`, whichever shape the request came in: an OpenAI body or today's `prompt` /
`messages` fields (`Asks` is the same for both)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
SCORE: Final = "/v1/score"
RERANK: Final = "/v1/rerank"

# The endpoints a request may name. Chat and completions generate text; the rest run a pooling
# model (an embedding variant); score and rerank only where the engine serves them (vLLM).
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/v1/rerank"]
ENDPOINTS: tuple[str, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, SCORE, RERANK)
GENERATE = (CHAT, COMPLETIONS)
# What reports call the endpoint of a request without a body (a prompt or messages).
NO_BODY = "none"

# The body fields that hold a prompt's text, by endpoint (what the hooks and the echo engine read).
_INPUT_FIELDS = {
    CHAT: ("messages",),
    COMPLETIONS: ("prompt",),
    EMBEDDINGS: ("input",),
    SCORE: ("text_1", "text_2", "queries", "documents", "data_1", "data_2"),
    RERANK: ("query", "documents"),
}


class BodyError(ValueError):
    """A body abqueue cannot read what it needs from (the caller's fault: a 400, a dead letter);
    `param` names the field at fault, as OpenAI's error body does."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Asks:
    """What a request asks for, as abqueue reads it."""

    endpoint: str
    max_tokens: int | None  # None: not set (a body's engine then stops at the context's end)
    n: int
    logprobs: bool
    top_logprobs: int | None
    texts: tuple[str, ...]  # the prompt's text, in order (chat: each message's text)
    stream: bool = False  # answered as chunks as they are made, on the request's reply topic
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    @property
    def prompt_chars(self) -> int:
        return sum(len(t) for t in self.texts)

    @property
    def generates(self) -> bool:
        return self.endpoint in GENERATE


def _int(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BodyError(f"{name} must be a whole number of at least {low}", name)
    return value


# OpenAI's documented bounds of the common sampling fields. abqueue checks only these, so that an
# out-of-range value is a 400 at the gateway and a refused line at upload, whichever engine serves
# it (the echo engine would ignore it); every other field is vLLM's to judge.
_BOUNDS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0)}  # fmt: skip


def _spec_bounds(body: dict) -> None:
    for name, (low, high) in _BOUNDS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BodyError(f"{name} must be a number", name)
        if value < low:
            raise BodyError(f"{name} must be greater than or equal to {low:g}", name)
        if value > high:
            raise BodyError(f"{name} must be less than or equal to {high:g}", name)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise BodyError("stop must be a string or a list of strings", "stop")
        if any(not x for x in stops):
            raise BodyError("'stop' sequences must not be empty strings", "stop")


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined (image and audio parts carry none)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise BodyError("a message's content must be a string or a list of content parts")


def _strings(value: Any) -> list[str]:
    """The strings in an input field (a string, a list of them, or nested lists; token ids carry none)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):  # rerank documents and score data may be {"text": ...} or content parts
        return [s for v in value.values() for s in _strings(v)]
    return []


def body_asks(endpoint: str, body: dict) -> Asks:
    """What an OpenAI body asks for; BodyError where a field abqueue reads has the wrong shape."""
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BodyError("messages must be a non-empty list", "messages")
        texts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BodyError(
                    f"messages.{i} must be an object with 'role' and 'content', not JSON {_kind(m)}", f"messages.{i}"
                )
            try:
                texts.append(content_text(m.get("content")))
            except BodyError as e:
                raise BodyError(f"messages.{i}: {e}", f"messages.{i}.content") from None
        max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
        logprobs = body.get("logprobs") is True
        top = _int(body, "top_logprobs", 0)
    elif endpoint == COMPLETIONS:
        if "prompt" not in body:
            raise BodyError("prompt is required", "prompt")
        texts = _strings(body["prompt"])
        max_tokens = _int(body, "max_tokens", 1)
        # The legacy completions API: logprobs is the number of top tokens.
        top = _int(body, "logprobs", 0)
        logprobs = top is not None
    elif endpoint in _INPUT_FIELDS:
        texts = [s for f in _INPUT_FIELDS[endpoint] for s in _strings(body.get(f))]
        if endpoint == EMBEDDINGS and "input" not in body:
            raise BodyError("input is required", "input")
        max_tokens, logprobs, top = None, False, None
    else:
        raise BodyError(f"endpoint {endpoint!r} is not one abqueue serves; use one of {', '.join(ENDPOINTS)}")
    if endpoint in GENERATE:
        _spec_bounds(body)
    stream, include_usage = _stream(endpoint, body)
    return Asks(endpoint, max_tokens, _int(body, "n", 1) or 1, logprobs, top, tuple(texts), stream, include_usage)


def _stream(endpoint: str, body: dict) -> tuple[bool, bool]:
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise BodyError("stream must be true or false", "stream")
    if stream and endpoint not in GENERATE:
        raise BodyError(f"{endpoint} does not stream; leave stream out", "stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise BodyError("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise BodyError("stream_options must be an object", "stream_options")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise BodyError("stream_options.include_usage must be true or false", "stream_options.include_usage")
    return True, bool(usage)


def map_texts(endpoint: str, body: dict, fn: Callable[[str], str]) -> dict:
    """The body with every prompt text passed through fn (a hook redacting what the model must not
    see): message contents and their text parts, prompts, inputs. Other fields are kept as they are."""

    def each(value: Any) -> Any:
        if isinstance(value, str):
            return fn(value)
        if isinstance(value, list):
            return [each(v) for v in value]
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            return {**value, "text": fn(value["text"])}
        return value

    out = dict(body)
    if endpoint == CHAT:
        out["messages"] = [
            {**m, "content": each(m["content"])} if isinstance(m, dict) and m.get("content") is not None else m
            for m in body.get("messages") or ()
        ]
    else:
        for field in _INPUT_FIELDS.get(endpoint, ()):
            if field in body:
                out[field] = each(body[field])
    return out


def answer_texts(endpoint: str, body: dict) -> list[str]:
    """The texts of a generated answer's choices (what a response hook reads and may replace)."""
    choices = body.get("choices") or []
    if endpoint == CHAT:
        return [((c.get("message") or {}).get("content") or "") for c in choices]
    return [c.get("text") or "" for c in choices]


def with_answer_texts(endpoint: str, body: dict, texts: list[str]) -> dict:
    """The answer with its choices' texts replaced (by a response hook), all else as it was."""
    choices = []
    for c, text in zip(body.get("choices") or [], texts, strict=True):
        if endpoint == CHAT:
            choices.append({**c, "message": {**(c.get("message") or {}), "content": text}})
        else:
            choices.append({**c, "text": text})
    return {**body, "choices": choices}
