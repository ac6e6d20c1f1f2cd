"""A variant's treatment of a request, where the variant is more than a model: its system prompt and
its sampling settings. (Its LoRA adapter and chat template are the engine's part: the engine picks
them by the request's variant.)"""

from __future__ import annotations

from schemas import ChatMessage, InferenceRequest, VariantConfig
from schemas.body import CHAT, COMPLETIONS, GENERATE
from schemas.experiment import SamplingConfig


def apply_variant(request: InferenceRequest, variant: VariantConfig) -> InferenceRequest:
    """The request as `variant` runs it. A system prompt takes the place of the caller's system
    message in a chat, and goes before a plain prompt with a blank line between. Sampling settings
    replace the request's (max_tokens is a ceiling). Requests without either come back as they are."""
    if request.body is not None:
        return _apply_to_body(request, variant)
    update: dict = {}
    if (system := variant.system_prompt) is not None:
        if request.messages is not None:
            rest = [m for m in request.messages if m.role != "system"]
            update["messages"] = [ChatMessage(role="system", content=system), *rest]
        else:
            update["prompt"] = f"{system}\n\n{request.prompt}"
    if (s := variant.sampling) is not None:
        update.update(_replaced(s))
        if s.max_tokens is not None:
            update["max_tokens"] = min(request.max_tokens, s.max_tokens)
    return request.model_copy(update=update) if update else request


def _replaced(s: SamplingConfig) -> dict:
    """The sampling fields a variant sets in place of the request's."""
    return {name: value for name, value in (("temperature", s.temperature), ("top_p", s.top_p)) if value is not None}


def _apply_to_body(request: InferenceRequest, variant: VariantConfig) -> InferenceRequest:
    """The same treatment on an OpenAI body: the system message or the prompt, and the sampling
    fields of the body (chat's max_completion_tokens and max_tokens both meet the ceiling)."""
    body, endpoint = dict(request.body or {}), request.endpoint
    if (system := variant.system_prompt) is not None:
        if endpoint == CHAT:
            rest = [
                m for m in body["messages"] if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))
            ]
            body["messages"] = [{"role": "system", "content": system}, *rest]
        elif endpoint == COMPLETIONS and isinstance(body.get("prompt"), str):
            body["prompt"] = f"{system}\n\n{body['prompt']}"
    if (s := variant.sampling) is not None and endpoint in GENERATE:
        body.update(_replaced(s))
        if s.max_tokens is not None:
            names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None] or ["max_tokens"]
            for name in names:
                body[name] = min(body.get(name) or s.max_tokens, s.max_tokens)
    if body == request.body:
        return request
    return request.model_copy(update={"body": body})
