"""Feedback: what a user thought of a response (thumbs up/down, or a score), joined to it by the
caller's tag and request id: request ids are the callers' own, and two callers may use the same."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    request_id: str = Field(min_length=1, max_length=256)
    experiment: str = Field(min_length=1, max_length=100)
    caller_tag: str | None = Field(
        default=None,
        max_length=64,
        description="the caller_tag of the answer it judges (AbqClient.feedback sets its own; `abq submit` prints "
        "it in the response): feedback lands only on the answer with the same tag and request id",
    )
    thumbs: Literal["up", "down"] | None = None
    score: float | None = Field(default=None, description="any scale; compared as a mean per variant")
    comment: str | None = Field(default=None, max_length=10_000)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _something(self) -> Feedback:
        if self.thumbs is None and self.score is None:
            raise ValueError("feedback needs 'thumbs' (up or down) or a 'score'")
        return self
