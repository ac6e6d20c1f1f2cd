"""OpenAI's streamed chunk objects (`chat.completion.chunk`, and `text_completion` chunks for
completions), as vLLM's serving layer and OpenAI make them: made from text as an engine produces it
(`delta`), joined back into the whole answer a stream adds up to (`join`: what the responses topic
records for a streamed request), and split from a whole answer (`split`: an engine that answers whole
still streams, in one go)."""

from __future__ import annotations

import time
from typing import Any

from schemas.body import CHAT

_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def chunk(
    endpoint: str, answer_id: str, model: str, created: int, choices: list[dict], usage: dict | None = None
) -> dict:
    out: dict[str, Any] = {
        "id": answer_id,
        "object": "chat.completion.chunk" if endpoint == CHAT else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def delta(endpoint: str, index: int, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
    """One choice's piece of a chunk: `first` opens a chat choice with the assistant's role."""
    if endpoint == CHAT:
        d: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage_chunk(endpoint: str, answer_id: str, model: str, created: int, usage: dict) -> dict:
    """The last chunk where the caller asked for `stream_options.include_usage`: no choices, the usage."""
    return chunk(endpoint, answer_id, model, created, [], usage)


def text_of(endpoint: str, chunks: list[dict]) -> str:
    """The generated text of the first choice a stream carries (what a reader prints)."""
    return "".join(
        ((c.get("delta") or {}).get("content") or "") if endpoint == CHAT else (c.get("text") or "")
        for ch in chunks
        for c in ch.get("choices") or ()
        if c.get("index", 0) == 0
    )


def join(endpoint: str, chunks: list[dict]) -> dict:
    """The whole chat.completion or text_completion a stream's chunks add up to: each choice's text,
    reasoning, tool calls (their arguments joined, as OpenAI's SDK joins them) and logprobs, its finish
    reason, and the usage chunk's usage."""
    chat = endpoint == CHAT
    choices: dict[int, dict] = {}
    usage = None
    for ch in chunks:
        if ch.get("usage"):
            usage = ch["usage"]
        for c in ch.get("choices") or ():
            i = c.get("index", 0)
            acc = choices.setdefault(i, _empty_choice(i, chat))
            if chat:
                _add_delta(acc["message"], c.get("delta") or {})
            else:
                acc["text"] += c.get("text") or ""
            if c.get("logprobs"):
                _add_logprobs(acc, c["logprobs"], chat)
            for key in ("finish_reason", "stop_reason"):
                if c.get(key) is not None:
                    acc[key] = c[key]
    for acc in choices.values():
        msg = acc.get("message")
        if msg is not None:
            for call in msg.get("tool_calls") or ():
                call.pop("index", None)
            if msg["content"] is None and not msg.get("tool_calls"):
                msg["content"] = ""
    first = chunks[0] if chunks else {}
    body: dict[str, Any] = {
        "id": first.get("id", ""),
        "object": "chat.completion" if chat else "text_completion",
        "created": first.get("created", int(time.time())),
        "model": first.get("model", ""),
        "choices": [choices[i] for i in sorted(choices)],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _empty_choice(i: int, chat: bool) -> dict:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": None}, "logprobs": None, "finish_reason": None}
    return {"index": i, "text": "", "logprobs": None, "finish_reason": None}


def _add_delta(msg: dict, d: dict) -> None:
    if d.get("role"):
        msg["role"] = d["role"]
    for key in _TEXT_FIELDS:
        if d.get(key) is not None:
            msg[key] = (msg.get(key) or "") + d[key]
    for tc in d.get("tool_calls") or ():
        calls = msg.setdefault("tool_calls", [])
        at = tc.get("index", len(calls))
        call = next((x for x in calls if x["index"] == at), None)
        if call is None:
            call = {"index": at, "id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            calls.append(call)
        if tc.get("id"):
            call["id"] = tc["id"]
        if tc.get("type"):
            call["type"] = tc["type"]
        fn = tc.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""


def _add_logprobs(acc: dict, lp: dict, chat: bool) -> None:
    if chat:
        have = acc["logprobs"] or {"content": [], "refusal": None}
        have["content"] = (have.get("content") or []) + (lp.get("content") or [])
    else:
        have = acc["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            have[key] = (have.get(key) or []) + (lp.get(key) or [])
    acc["logprobs"] = have


def split(endpoint: str, body: dict, include_usage: bool) -> list[dict]:
    """A whole answer as a stream: per choice, its message (role, text, tool calls with their
    indexes) and then its finish reason; the usage chunk last where asked for."""
    chat = endpoint == CHAT
    rid, model, created = body.get("id", ""), body.get("model", ""), int(body.get("created") or time.time())
    out = []
    for c in body.get("choices") or ():
        i = c.get("index", 0)
        if chat:
            msg = {k: v for k, v in (c.get("message") or {}).items() if v is not None}
            if msg.get("tool_calls"):
                msg["tool_calls"] = [{"index": j, **call} for j, call in enumerate(msg["tool_calls"])]
            piece = {"index": i, "delta": msg, "logprobs": c.get("logprobs"), "finish_reason": None}
            end = {"index": i, "delta": {}, "logprobs": None, "finish_reason": c.get("finish_reason")}
        else:
            piece = {"index": i, "text": c.get("text") or "", "logprobs": c.get("logprobs"), "finish_reason": None}
            end = {"index": i, "text": "", "logprobs": None, "finish_reason": c.get("finish_reason")}
        out += [chunk(endpoint, rid, model, created, [piece]), chunk(endpoint, rid, model, created, [end])]
    if include_usage and body.get("usage"):
        out.append(usage_chunk(endpoint, rid, model, created, body["usage"]))
    return out
