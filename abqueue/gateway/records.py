"""The gateway's files and batches: OpenAI's File and Batch objects, as the API returns them and as
they are kept in the compacted topics (with the tenant and the storage path, which the API never
shows)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field

from abqueue.kafka.acls import GATEWAY_TOPICS

# "_": no experiment name starts so, whose topics (abq.NAME.*) these could meet (acls.GATEWAY_TOPICS).
FILES_TOPIC = f"{GATEWAY_TOPICS}files"
BATCHES_TOPIC = f"{GATEWAY_TOPICS}batches"
BATCH_PARTITIONS = 6  # batches are spread over the replicas by partition
MAX_WINDOW_S = 7 * 86_400  # the longest completion window

PRIVATE = {"tenant", "path", "lines", "model", "url"}

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]  # fmt: skip
TERMINAL = {"failed", "completed", "expired", "cancelled"}


class _Stored(BaseModel):
    """A stored object; the API shows it without what only the gateway needs (PRIVATE)."""

    def api(self) -> dict[str, Any]:
        return self.model_dump(exclude=PRIVATE)


class FileRecord(_Stored):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None
    tenant: str
    path: str  # relative to the storage directory
    lines: int = 0
    model: str | None = None  # the experiment a batch input file's lines name
    url: str | None = None  # and the endpoint


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchRecord(_Stored):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    tenant: str
    model: str | None = None


def merge_batch(old: BatchRecord | None, new: BatchRecord) -> BatchRecord:
    """What a replica keeps of a batch when a record of it arrives; replicas write independently.
    A terminal status never changes (a replica with a stale view wrote `cancelling` after the owner
    wrote `completed`, and the batch ended cancelled, its completed_at lost). A batch asked to cancel
    stays cancelling until it ends, whatever progress its runner wrote in the meantime."""
    if old is not None and old.status in TERMINAL:
        return old
    if old is not None and old.status == "cancelling" and new.status in ("validating", "in_progress", "finalizing"):
        return new.model_copy(update={"status": "cancelling", "cancelling_at": old.cancelling_at})
    return new


_WINDOW = re.compile(r"^(\d+)([smhd])$")


def window_seconds(text: str) -> int | None:
    """A completion window like 24h, 30m or 7d in seconds; None if it is not one."""
    m = _WINDOW.match(text)
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)] if m else None
