"""W3C trace context: the `traceparent` header that travels from producer to response."""

from __future__ import annotations

import random
import re
import secrets

HEADER = "traceparent"
_PATTERN = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def is_valid(value: str) -> bool:
    m = _PATTERN.match(value)
    return m is not None and m.group(1) != "0" * 32 and m.group(2) != "0" * 16


def child_of(traceparent: str | None) -> str | None:
    """The same trace with a new span id, for the hop a worker adds; None if the parent is invalid."""
    if not traceparent or not is_valid(traceparent):
        return None
    _, trace_id, _, flags = traceparent.split("-")
    # A span id need only be unique, not secret: no system call per response (os.urandom was 1.6% of
    # a busy worker's samples). Zero is invalid.
    return f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-{flags}"


def trace_id(traceparent: str | None) -> str | None:
    return traceparent.split("-")[1] if traceparent and is_valid(traceparent) else None


def header_value(headers, name: str = HEADER) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode("ascii", "replace")
    return None
