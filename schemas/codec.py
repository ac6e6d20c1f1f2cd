"""Wire encoding: every contract travels as orjson-encoded JSON."""

from __future__ import annotations

import difflib
from collections.abc import Collection

import orjson
from pydantic import BaseModel, ValidationError

from abqueue.errors import AbqError
from schemas.request import InferenceRequest
from schemas.response import InferenceResponse


class SchemaError(AbqError, ValueError):
    """A record that is not a valid message. `reason` is a DeadLetter reason code."""

    def __init__(self, reason: str, detail: str, address: dict[str, str] | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.address = address or {}


# Where an invalid request can still be answered: the fields a caller waits on, where they are
# readable strings of the lengths the contract allows (whatever else is wrong with the record).
_ADDRESS_FIELDS = {"id": 256, "routing_key": 512, "reply_to": 249, "caller_tag": 64}


def _address(obj: dict) -> dict[str, str]:
    return {f: v for f, n in _ADDRESS_FIELDS.items() if isinstance(v := obj.get(f), str) and 0 < len(v) <= n}


def encode(message: BaseModel) -> bytes:
    return orjson.dumps(message.model_dump(mode="json", exclude_none=True))


def describe(err: ValidationError, limit: int = 1, whole: str | None = "(record)", known: Collection[str] = ()) -> str:
    """One line of a validation error: `field.path: message` for the first `limit` problems, unknown
    keys first (a misspelt key also makes its real one look missing), each with the closest of
    `known` names. `whole`: what to call the top level (None: no prefix for its errors)."""
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or whole
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"]:
            key = str(e["loc"][-1])
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            msg = f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


_PARAM_FIELDS = {"max_tokens", "temperature", "top_p", "stop", "seed", "n", "logprobs", "top_logprobs"}


def decode_request(data: bytes) -> InferenceRequest:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise SchemaError("not_json", f"record is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SchemaError("invalid_schema", f"record is JSON {type(obj).__name__}, expected an object")
    try:
        return InferenceRequest.model_validate(obj)
    except ValidationError as e:
        # Sampling parameters out of range get their own reason: the sender's contract is fine,
        # its values are not, and that is what an operator looking at the dead-letter topic wants to know.
        fields = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        reason = "invalid_params" if fields and fields <= _PARAM_FIELDS else "invalid_schema"
        raise SchemaError(reason, describe(e, limit=5), _address(obj)) from None


def decode_response(data: bytes) -> InferenceResponse:
    return InferenceResponse.model_validate_json(data)
