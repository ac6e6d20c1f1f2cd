"""The OpenAI Batch line formats: input `{custom_id, method, url, body}` and output
`{id, custom_id, response: {status_code, request_id, body}, error}`, so existing tools read our results."""

from __future__ import annotations

import uuid
from typing import Any

from schemas import InferenceResponse
from schemas.answers import generated_body
from schemas.body import ENDPOINTS, BodyError, body_asks


class UnsupportedLine(ValueError):
    """A batch line abqueue cannot send; `param` names the body's field at fault, where one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def is_openai_line(obj: dict) -> bool:
    return "custom_id" in obj and "body" in obj


def to_request_fields(obj: dict, streams: bool = False) -> dict[str, Any]:
    """Our request fields (without experiment/variant) from one OpenAI batch input line: its body,
    for its url, as the line wrote it (the variant's engine serves any field it knows). streams: the
    caller reads a stream (the gateway's endpoints); a batch line's answer is whole."""
    method, url, body = obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if method != "POST":
        raise UnsupportedLine(f"method {method!r} is not supported; batch lines use POST")
    if url not in ENDPOINTS:
        raise UnsupportedLine(f"url {url!r} is not an endpoint abqueue serves; use one of {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise UnsupportedLine("'body' must be an object")
    if body.get("stream") and not streams:
        raise UnsupportedLine("stream: true is not supported in a batch line; leave it out")
    try:
        body_asks(url, body)
    except BodyError as e:
        raise UnsupportedLine(str(e), e.param) from None
    model = body.get("model")
    return {
        "id": str(obj["custom_id"]),
        "endpoint": url,
        "body": body,
        "routing_key": str(body.get("user") or obj["custom_id"]),
        "metadata": {"requested_model": model} if isinstance(model, str) else {},
    }


# cancelled: 499, nginx's "client closed request" (whoever reads it cancelled it, or another of its tag did)
STATUS = {"expired": 408, "invalid_request": 400, "too_large": 413, "engine_error": 500, "internal": 500,
          "cancelled": 499}  # fmt: skip

# OpenAI's error types by HTTP status: the one vocabulary of every error body abqueue writes (the
# gateway's own refusals and the answers workers failed), so a client never meets a second one. The
# worker's own code (engine_error, expired, ...) stays in `code`.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "timeout", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 504: "timeout"}  # fmt: skip


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def output_line(custom_id: str, resp: InferenceResponse, url: str) -> dict[str, Any]:
    """One OpenAI batch output line for a response (a failed one carries an error body). The line
    also keeps abqueue's whole response under `abq` (tools that read OpenAI's format ignore keys
    they do not know), so that `abq report --input` can analyse it: variant, timings, usage."""
    return {**_openai_line(custom_id, resp, url), ABQ_KEY: resp.model_dump(mode="json", exclude_none=True)}


ABQ_KEY = "abq"


def _openai_line(custom_id: str, resp: InferenceResponse, url: str) -> dict[str, Any]:
    status = STATUS.get(resp.error.code, 500) if resp.error is not None else 200
    body = error_body(resp, status) if resp.error is not None else completion_body(resp, url)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": resp.request_id, "body": body},
        "error": None,
    }


def error_answer(resp: InferenceResponse) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of a failed response."""
    assert resp.error is not None
    status = 504 if resp.error.code == "expired" else STATUS.get(resp.error.code, 500)
    return status, error_body(resp, status)


def error_body(resp: InferenceResponse, status: int) -> dict[str, Any]:
    """OpenAI's error object for a failed response answered with `status`."""
    assert resp.error is not None
    return {
        "error": {"message": resp.error.message, "type": error_type(status), "param": None, "code": resp.error.code}
    }


def completion_body(resp: InferenceResponse, url: str) -> dict[str, Any]:
    """OpenAI's response body for an answered response: the one the engine made for a request with a
    body, else a chat.completion or text_completion made from the outputs of one without."""
    if resp.body is not None:
        return resp.body
    return generated_body(
        url, resp.request_id, resp.model, resp.outputs, resp.finish_reason, resp.logprobs,
        resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.timings.finished,
    )  # fmt: skip


def input_error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
