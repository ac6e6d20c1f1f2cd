"""OpenAI's request bodies in, abqueue's requests out, and OpenAI's error shape: the thin part of
the gateway that speaks the API. A body travels as the caller wrote it; the variant's engine serves it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from producers import openai_batch


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
    """Our request's fields (all but experiment and variant; the routing key is a batch line's) from an
    OpenAI body, as a batch line makes them: the body itself, for the variant's engine to serve (vLLM validates every field it knows, and its refusal
    comes back as a 400 with its message), or ApiError 400 naming the field abqueue could not read."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "model is required: the experiment's name (or experiment:variant to pin one)", "missing_required_parameter", "model")  # fmt: skip
    try:
        line = {"custom_id": request_id, "method": "POST", "url": url, "body": body}
        return openai_batch.to_request_fields(line, streams=True)
    except openai_batch.UnsupportedLine as e:
        code = "missing_required_parameter" if str(e).endswith("is required") else "invalid_value"
        raise ApiError(400, str(e), code, e.param) from None


def validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the body's field."""
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"]]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's message, not ours
    return ApiError(400, f"{param}: {msg}" if param else msg, "invalid_value", param)
