"""A variant's treatment of a request, where the variant is more than a model: its system prompt and
its sampling settings. (Its LoRA adapter and chat template are the engine's part: the engine picks
them by the request's variant.)"""

from __future__ import annotations

from schemas import ChatMessage, InferenceRequest, VariantConfig


def apply_variant(request: InferenceRequest, variant: VariantConfig) -> InferenceRequest:
    """The request as `variant` runs it. A system prompt takes the place of the caller's system
    message in a chat, and goes before a plain prompt with a blank line between. Sampling settings
    replace the request's (max_tokens is a ceiling). Requests without either come back as they are."""
    update: dict = {}
    if (system := variant.system_prompt) is not None:
        if request.messages is not None:
            rest = [m for m in request.messages if m.role != "system"]
            update["messages"] = [ChatMessage(role="system", content=system), *rest]
        else:
            update["prompt"] = f"{system}\n\n{request.prompt}"
    if variant.sampling is not None:
        s = variant.sampling
        if s.temperature is not None:
            update["temperature"] = s.temperature
        if s.top_p is not None:
            update["top_p"] = s.top_p
        if s.max_tokens is not None:
            update["max_tokens"] = min(request.max_tokens, s.max_tokens)
    return request.model_copy(update=update) if update else request
