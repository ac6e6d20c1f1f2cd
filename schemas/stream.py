"""The records of a streamed answer, and of a cancel.

A request whose body says `stream: true` is answered twice: its chunks as the engine makes them, a
few at a time, on the request's reply topic (`StreamPart` records, keyed by request id, beside its
whole response), and its whole response on the responses topic as every request is (reports,
rollouts and exactly-once read that one). Each part names its delivery `attempt`: a request redone
by another worker streams again under a new attempt, so a reader never mixes the chunks of two.

A `Cancel` on the experiment's cancel topic asks every worker of the experiment to stop a request:
skip it where it is still queued, abort it where the engine runs it. It names the caller's tag, and a
worker acts only on a request carrying that same tag, so nobody cancels what another caller sent."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

# Stream parts share the reply topic with whole responses; this header tells them apart without
# decoding (a reader that predates streaming skips what it cannot decode).
KIND_HEADER = "abq-kind"
STREAM_KIND = b"stream"


class StreamPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    caller_tag: str | None = Field(default=None, description="the request's caller_tag: a reader takes only its own")
    attempt: str = Field(description="the delivery attempt that made these chunks; a redone request streams anew")
    seq: int = Field(ge=0, description="0, 1, 2, ... within the attempt: a gap means a part was lost")
    chunks: list[dict[str, Any]] = Field(description="OpenAI chunk objects, in order, as the engine made them")
    last: bool = Field(default=False, description="the attempt's stream ends with this part")


def encode_part(part: StreamPart) -> bytes:
    return orjson.dumps(part.model_dump(mode="json"))


def decode_part(raw: bytes) -> StreamPart:
    return StreamPart.model_validate(orjson.loads(raw))


def is_part(headers: list[tuple[str, bytes]] | None) -> bool:
    return any(k == KIND_HEADER and v == STREAM_KIND for k, v in headers or ())


class Cancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    caller_tag: str = Field(min_length=1, description="the cancelled request's caller_tag; no other is touched")
    experiment: str
    at: float = Field(description="when the cancel was sent (Unix time)")


def encode_cancel(cancel: Cancel) -> bytes:
    return orjson.dumps(cancel.model_dump(mode="json"))


def decode_cancel(raw: bytes) -> Cancel:
    return Cancel.model_validate(orjson.loads(raw))
