"""Two small hooks to name in a variant's `hooks:` (and to copy from): a request hook that redacts
personal data from prompts, and a response hook that keeps the JSON of an answer."""

from __future__ import annotations

import json
import re

from schemas import InferenceRequest
from schemas.body import map_texts

# Order matters: card numbers before phone numbers, which would match their digits too.
PII = [
    ("[EMAIL]", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("[CARD]", re.compile(r"\b(?:\d[ -]?){13,19}\b")),
    ("[PHONE]", re.compile(r"(?<![\w])\+?\d[\d ()-]{7,}\d\b")),
    ("[IP]", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
]


def redact(text: str) -> str:
    for label, pattern in PII:
        text = pattern.sub(label, text)
    return text


def redact_pii(request: InferenceRequest) -> InferenceRequest:
    """abqueue.hooks:redact_pii: e-mail addresses, card and phone numbers and IP addresses in the
    prompt or the messages become [EMAIL], [CARD], [PHONE], [IP] before the model sees them."""
    if request.body is not None:
        assert request.endpoint is not None
        return request.model_copy(update={"body": map_texts(request.endpoint, request.body, redact)})
    if request.prompt is not None:
        return request.model_copy(update={"prompt": redact(request.prompt)})
    messages = [m.model_copy(update={"content": redact(m.content)}) for m in request.messages or ()]
    return request.model_copy(update={"messages": messages})


def extract_json(request: InferenceRequest, outputs: list[str]) -> list[str]:
    """abqueue.hooks:extract_json: each output cut to the first JSON object or array in it (models
    wrap JSON in prose and code fences), re-serialised compactly. An output without valid JSON
    raises, so the caller gets an error answer instead of text its parser would choke on."""
    return [_first_json(text) for text in outputs]


def _first_json(text: str) -> str:
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    raise ValueError(f"no JSON object or array in the answer ({len(text)} characters)")
