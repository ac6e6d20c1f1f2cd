"""The OpenAI Batch line formats: input `{custom_id, method, url, body}` and output
`{id, custom_id, response: {status_code, request_id, body}, error}`, so existing tools read our results."""

from __future__ import annotations

import time
import uuid
from typing import Any

from schemas import InferenceResponse
from schemas.response import TokenLogprob

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


class UnsupportedLine(ValueError):
    pass


def is_openai_line(obj: dict) -> bool:
    return "custom_id" in obj and "body" in obj


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts make sense for a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise UnsupportedLine(
                    f"content part of type {part.get('type') if isinstance(part, dict) else type(part).__name__} is not supported; send text parts only"
                )
            texts.append(part.get("text", ""))
        return "".join(texts)
    raise UnsupportedLine("message content must be a string or a list of text parts")


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def to_request_fields(obj: dict) -> dict[str, Any]:
    """Our request fields (without experiment/variant) from one OpenAI batch input line."""
    method, url, body = obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if method != "POST":
        raise UnsupportedLine(f"method {method!r} is not supported; batch lines use POST")
    if not isinstance(body, dict):
        raise UnsupportedLine("'body' must be an object")
    fields: dict[str, Any] = {"id": str(obj["custom_id"])}
    if url == CHAT_URL:
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            raise UnsupportedLine("chat body needs a 'messages' list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise UnsupportedLine(f"messages.{i} must be an object with 'role' and 'content', not JSON {_kind(m)}")
        fields["messages"] = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in msgs]
    elif url == COMPLETIONS_URL:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise UnsupportedLine("completions body needs 'prompt' as one string")
        fields["prompt"] = prompt
    else:
        raise UnsupportedLine(f"url {url!r} is not supported; use {CHAT_URL} or {COMPLETIONS_URL}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "n"):
        if body.get(name) is not None:
            fields[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = [stop] if isinstance(stop, str) else stop
    fields.update(_logprobs(body, chat=url == CHAT_URL))
    fields["routing_key"] = str(body.get("user") or obj["custom_id"])
    fields["metadata"] = {"openai_url": url, **({"requested_model": body["model"]} if "model" in body else {})}
    return fields


def _logprobs(body: dict, chat: bool) -> dict[str, Any]:
    """Chat: `logprobs` true and `top_logprobs` K. Completions (legacy): `logprobs` K, the chosen
    token's plus the K likeliest."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if want is None or want is False:
            if top is not None:
                raise UnsupportedLine("top_logprobs needs logprobs: true")
            return {}
        if want is not True:
            raise UnsupportedLine("logprobs must be true or false in a chat body")
        return {"logprobs": True, **({"top_logprobs": top} if top is not None else {})}
    if want is None:
        return {}
    if isinstance(want, bool) or not isinstance(want, int) or not 0 <= want <= 5:
        raise UnsupportedLine("logprobs in a completions body is a number of top tokens from 0 to 5")
    return {"logprobs": True, "top_logprobs": want}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(t.token, t.logprob), "top_logprobs": [entry(x.token, x.logprob) for x in t.top_logprobs]}
        for t in tokens
    ], "refusal": None}  # fmt: skip


def completion_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """A completions choice's legacy `logprobs`: parallel lists, top tokens as {token: logprob}."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{x.token: x.logprob for x in t.top_logprobs} for t in tokens],
        "text_offset": offsets,
    }


STATUS = {"expired": 408, "invalid_request": 400, "too_large": 413, "engine_error": 500, "internal": 500}

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


def error_body(resp: InferenceResponse, status: int) -> dict[str, Any]:
    """OpenAI's error object for a failed response answered with `status`."""
    assert resp.error is not None
    return {
        "error": {"message": resp.error.message, "type": error_type(status), "param": None, "code": resp.error.code}
    }


def completion_body(resp: InferenceResponse, url: str) -> dict[str, Any]:
    """OpenAI's chat.completion or text_completion object for an answered response."""
    chat = url == CHAT_URL
    choices = []
    for i, text in enumerate(resp.outputs):
        tokens = resp.logprobs[i] if resp.logprobs is not None and i < len(resp.logprobs) else None
        logprobs = None if tokens is None else chat_logprobs(tokens) if chat else completion_logprobs(tokens)
        choice: dict[str, Any] = {"index": i, "finish_reason": resp.finish_reason, "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{resp.request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(resp.timings.finished or time.time()),
        "model": resp.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": resp.usage.prompt_tokens,
            "completion_tokens": resp.usage.completion_tokens,
            "total_tokens": resp.usage.prompt_tokens + resp.usage.completion_tokens,
        },
    }


def input_error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
