"""OpenAI's request bodies in, abqueue's requests out, and OpenAI's error shape: the thin part of
the gateway that speaks the API (the translation of bodies and answers is producers.openai_batch's,
shared with `abq batch`)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from producers import openai_batch

# What a body may carry. The sampling parameters we cannot honour are refused at any value but
# their default, so that no client believes a setting took effect when it did not.
SUPPORTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
             "stop", "seed", "user", "stream", "logprobs", "top_logprobs"}  # fmt: skip
HARMLESS = {"store", "metadata", "service_tier", "stream_options"}  # no effect on the answer
AT_DEFAULT = {"frequency_penalty": 0, "presence_penalty": 0, "echo": False, "best_of": 1,
              "logit_bias": None, "suffix": None, "tools": None, "tool_choice": None, "functions": None,
              "function_call": None, "response_format": None, "parallel_tool_calls": None}  # fmt: skip


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = openai_batch.error_type(self.status)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def request_fields(body: Any, url: str, request_id: str) -> dict[str, Any]:
    """Our request's fields (all but experiment, variant and routing) from an OpenAI body, or
    ApiError 400 naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if body.get("stream"):
        raise ApiError(400, "stream: true is not supported; leave it out and the answer comes whole", "unsupported_parameter", "stream")  # fmt: skip
    for name, value in body.items():
        if name in SUPPORTED or name in HARMLESS:
            continue
        if name in AT_DEFAULT:
            if value is None or value == AT_DEFAULT[name] or value in ({}, []):
                continue
            raise ApiError(400, f"{name} is not supported by this gateway; leave it out or at its default", "unsupported_parameter", name)  # fmt: skip
        raise ApiError(400, f"unknown parameter {name!r}", "unknown_parameter", name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "model is required: the experiment's name (or experiment:variant to pin one)", "missing_required_parameter", "model")  # fmt: skip
    if url == openai_batch.CHAT_URL and "messages" not in body:
        raise ApiError(400, "messages is required", "missing_required_parameter", "messages")
    if url == openai_batch.COMPLETIONS_URL and "prompt" not in body:
        raise ApiError(400, "prompt is required", "missing_required_parameter", "prompt")
    try:
        return openai_batch.to_request_fields({"custom_id": request_id, "method": "POST", "url": url, "body": body})
    except openai_batch.UnsupportedLine as e:
        raise ApiError(400, str(e), "invalid_value") from None


def validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the body's field."""
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"]]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's message, not ours
    return ApiError(400, f"{param}: {msg}" if param else msg, "invalid_value", param)
