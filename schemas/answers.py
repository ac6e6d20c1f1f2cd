"""OpenAI response bodies made from what an engine without vLLM's serving layer returns (the echo and
sim engines, static batches, and requests without a body answered through an OpenAI endpoint): a
chat.completion or text_completion from output texts, and a list of embeddings from vectors. vLLM's
serving layer makes its own; these have the same shapes, so a caller cannot tell the engines apart by
the shape of what comes back."""

from __future__ import annotations

import time
from typing import Any

from schemas.body import CHAT
from schemas.response import TokenLogprob


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


def generated_body(
    endpoint: str,
    request_id: str,
    model: str,
    outputs: list[str],
    finish_reason: str | None,
    logprobs: list[list[TokenLogprob]] | None,
    prompt_tokens: int,
    completion_tokens: int,
    created: float | None = None,
) -> dict[str, Any]:
    """OpenAI's chat.completion (endpoint /v1/chat/completions) or text_completion object."""
    chat = endpoint == CHAT
    choices = []
    for i, text in enumerate(outputs):
        tokens = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        lp = None if tokens is None else chat_logprobs(tokens) if chat else completion_logprobs(tokens)
        choice: dict[str, Any] = {"index": i, "finish_reason": finish_reason, "logprobs": lp}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(created or time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def embedding_body(request_id: str, model: str, vectors: list[list[float]], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's CreateEmbeddingResponse: one {"object": "embedding", "index", "embedding"} per input."""
    return {
        "id": f"embd-{request_id}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
