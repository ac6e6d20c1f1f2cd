"""A body request as a request without a body (`prompt` or `messages` and the sampling fields), for
an engine that only serves those: the static-batching vLLM engine, whose offline `LLM.generate` has
no OpenAI serving layer. Only bodies that say nothing else can be lowered; the others are refused
with the field at fault, so no caller believes a setting took effect when it did not."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.body import CHAT, COMPLETIONS, BodyError, content_text
from schemas.request import InferenceRequest

# What such a request can say; HARMLESS changes nothing in the answer.
LOWERABLE = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
             "stop", "seed", "user", "logprobs", "top_logprobs"}  # fmt: skip
HARMLESS = {"store", "metadata", "service_tier", "stream_options", "stream"}


def lowered(request: InferenceRequest) -> InferenceRequest:
    """The request without its body; BodyError naming the first field that cannot be lowered."""
    if request.body is None:
        return request
    body, endpoint = request.body, request.endpoint
    if endpoint not in (CHAT, COMPLETIONS):
        raise BodyError(f"{endpoint} needs an engine with vLLM's serving layer (engine: vllm)")
    for name, value in body.items():
        if name not in LOWERABLE and name not in HARMLESS and value not in (None, [], {}):
            raise BodyError(f"{name} needs an engine with vLLM's serving layer (engine: vllm)")
    fields: dict[str, Any] = {}
    if endpoint == CHAT:
        parts = [m.get("content") for m in body["messages"]]
        if any(isinstance(c, list) and any(p.get("type") != "text" for p in c if isinstance(p, dict)) for c in parts):
            raise BodyError("content parts other than text need an engine with vLLM's serving layer (engine: vllm)")
        fields["messages"] = [
            {"role": m.get("role"), "content": content_text(m.get("content"))} for m in body["messages"]
        ]
    else:
        if not isinstance(body["prompt"], str):
            raise BodyError("a prompt other than one string needs an engine with vLLM's serving layer (engine: vllm)")
        fields["prompt"] = body["prompt"]
    asks = request.asks()
    if asks.max_tokens is not None:
        fields["max_tokens"] = asks.max_tokens
    for name in ("temperature", "top_p", "seed", "n"):
        if body.get(name) is not None:
            fields[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = [stop] if isinstance(stop, str) else stop
    if asks.logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = asks.top_logprobs
    envelope = request.model_dump(exclude={"endpoint", "body", "prompt", "messages"}, exclude_defaults=True)
    try:
        return InferenceRequest.model_validate({**envelope, "id": request.id, **fields})
    except ValidationError as e:
        first = e.errors()[0]
        raise BodyError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
