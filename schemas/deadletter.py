"""DeadLetter: a record a worker could not serve, kept with its original bytes and the reason."""

from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeadLetterReason = Literal[
    "not_json",
    "invalid_schema",
    "wrong_variant",
    "wrong_experiment",
    "invalid_params",
    "oversized_prompt",
    "unsupported",
    "reply_to_refused",
    "invalid_header",
    "hook_failed",
]


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    reason: DeadLetterReason
    detail: str = Field(description="one line a person can act on")
    source_topic: str
    source_partition: int
    source_offset: int
    original_key_b64: str | None = None
    original_key_truncated: bool = Field(
        default=False, description="true when only the key's first bytes are kept (here and as the record's key)"
    )
    original_value_b64: str = Field(description="the record's value exactly as consumed, base64")
    original_value_truncated: bool = Field(
        default=False, description="true when only the value's first bytes are kept, to fit the dead-letter topic"
    )
    request_id: str | None = Field(default=None, description="when the id could be read")
    worker_id: str
    dead_lettered_at: float = Field(default_factory=time.time)

    @staticmethod
    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode("ascii")

    def original_value(self) -> bytes:
        return base64.b64decode(self.original_value_b64)
