"""`stream: true` at the gateway: server-sent events as OpenAI and vLLM send them (`data: {chunk}` per
chunk, then `data: [DONE]`), the first as soon as the worker's first chunk reaches this replica's reply
topic.

The status line waits for that first chunk, so a request refused or failed before anything streamed
is answered as a whole request would be (its status and OpenAI's error body). Once chunks have gone
out, an error can only be an event: OpenAI's error object in a `data:` line, then `[DONE]`; that is how
a stream ends whose worker died after streaming part of it (the redone request's chunks never join
another attempt's), and one whose reader fell too far behind."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from abqueue.gateway.openai_api import ApiError
from producers import openai_batch
from producers.client import ReplyTimeout, Stream, StreamError
from producers.publisher import RequestTooLarge

DONE = b"data: [DONE]\n\n"
_END = object()


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.open = Gauge("abq_gateway_streams_open", "Streams this replica is sending now", registry=registry)
        self.first_chunk = Histogram(
            "abq_gateway_time_to_first_chunk_seconds", "A streamed request's arrival to its first chunk sent",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry,
        )  # fmt: skip
        self.ended = Counter(
            "abq_gateway_streams_ended",
            "Streams ended, by how: done, error (an error event after chunks), slow_reader (fell too far "
            "behind), stream_interrupted (its worker died mid-stream), disconnected (the caller went away)",
            ["how"], registry=registry,
        )  # fmt: skip
        self.chunks = Counter("abq_gateway_stream_chunks", "Chunks sent as events", registry=registry)


def _next(chunks: Stream) -> Any:
    """The next record's chunks: one thread hop per record, not per chunk."""
    try:
        return chunks.next_chunks()
    except StopIteration:
        return _END


def _error_event(e: StreamError) -> bytes:
    status = 500 if e.reply is None else openai_batch.error_answer(e.reply.response)[0]
    return event({"error": {"message": str(e), "type": openai_batch.error_type(status), "param": None, "code": e.code}})


async def stream_response(
    chunks: Stream,
    headers: dict[str, str],
    limiter: anyio.CapacityLimiter,
    metrics: StreamMetrics,
    started: float,
    on_end: Callable[[str], None],
) -> tuple[int, Response]:
    """(status, response) for a stream: a JSON error where nothing streamed, else the events.
    on_end(how) once the stream is over, however it ended."""
    try:
        first = await anyio.to_thread.run_sync(_next, chunks, limiter=limiter)
    except BaseException as e:
        chunks.close()
        if isinstance(e, StreamError) and e.reply is not None:
            status, body = openai_batch.error_answer(e.reply.response)
            return status, JSONResponse(body, status_code=status, headers=headers)
        if isinstance(e, StreamError):
            raise ApiError(502, str(e), e.code) from None
        if isinstance(e, ReplyTimeout):
            raise ApiError(504, str(e), "timeout") from None
        if isinstance(e, RequestTooLarge):
            raise ApiError(413, str(e), "request_too_large") from None
        raise
    metrics.first_chunk.observe(time.monotonic() - started)

    async def events() -> AsyncIterator[bytes]:
        how, item = "disconnected", first
        metrics.open.inc()
        try:
            while item is not _END:
                metrics.chunks.inc(len(item))
                yield b"".join(event(c) for c in item)
                item = await anyio.to_thread.run_sync(_next, chunks, limiter=limiter)
            how = "done"
            yield DONE
        except (StreamError, ReplyTimeout) as e:
            how = e.code if isinstance(e, StreamError) and e.code in ("slow_reader", "stream_interrupted") else "error"
            yield _error_event(e if isinstance(e, StreamError) else StreamError(str(e), "timeout"))
            yield DONE
        finally:
            metrics.open.dec()
            metrics.ended.labels(how).inc()
            chunks.close()
            on_end(how)

    return 200, StreamingResponse(events(), media_type="text/event-stream", headers=headers)
