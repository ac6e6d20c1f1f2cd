"""Streamed answers on their way out: each streamed request's chunks, coalesced into a few records, sent
to its reply topic as the engine makes them.

A record per token would make a 500-token answer 500 records through the broker; a record per answer
would not stream. So a stream's first chunks go out at once, up to the first that says something
(time to first token is what streaming is for), and after it a record at most every `interval_s`,
or as soon as `max_chunks` have gathered. The records are sent from a thread of the publisher's
own: the engine's event loop only appends to a list.

Parts are keyed as the request's response is (its routing key), so they share a partition with it, and
a stream's last part is acknowledged before its response is sent (`Streaming.before_deliver`): a reader
sees the end of the stream before the whole answer."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from schemas.stream import KIND_HEADER, STREAM_KIND, StreamPart, encode_part

log = logging.getLogger(__name__)

STREAM_INTERVAL_S = 0.05  # at most this long between a chunk and the record that carries it
MAX_CHUNKS = 16  # or a record as soon as this many have gathered


_SAYING = ("content", "tool_calls", "reasoning_content", "reasoning", "refusal")


def says_something(chunk: dict[str, Any]) -> bool:
    """A chunk with generated text or a tool call (not the role alone, nor the usage)."""
    choices = chunk.get("choices") or ()
    return any(c.get("text") or any((c.get("delta") or {}).get(k) for k in _SAYING) for c in choices)


class ChunkStream:
    """One streamed request's chunks. `put` is called from the engine's thread, `flush` from the
    publisher's, `end` from the worker's loop: one lock orders them, and sends happen under it, so
    parts reach the producer in the order of their sequence numbers."""

    def __init__(
        self, publisher: StreamPublisher, topic: str, key: bytes, request_id: str, caller_tag: str | None, variant: str
    ):
        self._publisher, self.topic, self.key = publisher, topic, key
        self.request_id, self.caller_tag, self.variant = request_id, caller_tag, variant
        self._lock = threading.Lock()
        self._buffer: list[dict[str, Any]] = []
        self.attempt = publisher.new_attempt()
        self.seq = 0
        self.chunks = 0  # chunks put in this attempt
        self.spoke = False  # a chunk with generated text (or a tool call) has been put in this attempt
        self.due_at: float | None = None  # when the buffer must go out (monotonic)
        self.ended = False

    def put(self, chunk: dict[str, Any]) -> None:
        with self._lock:
            if self.ended:
                return
            self._buffer.append(chunk)
            self.chunks += 1
            now = time.monotonic()
            # At once until the first chunk that says something: vLLM opens a chat stream with a chunk
            # holding the role alone, and coalescing the first token after it cost TTFT up to 50 ms.
            first = not self.spoke
            self.spoke = self.spoke or says_something(chunk)
            if first or len(self._buffer) >= self._publisher.max_chunks:
                self.due_at = now
            elif self.due_at is None:
                self.due_at = now + self._publisher.interval_s
        self._publisher.schedule(self)

    def restart(self) -> None:
        """The engine starts this request (again, after a retry): what it makes now is a new attempt,
        so a reader never joins the first try's chunks to the second's."""
        with self._lock:
            if self.seq or self._buffer:
                self.attempt = self._publisher.new_attempt()
                self.seq, self.chunks, self._buffer, self.due_at, self.spoke = 0, 0, [], None, False

    def flush(self, last: bool = False) -> Any:
        """Sends what has gathered (and, with last, the end of the stream); the send's result or None."""
        with self._lock:
            if self.ended or not (self._buffer or last):
                return None
            part = StreamPart(
                request_id=self.request_id, caller_tag=self.caller_tag, attempt=self.attempt, seq=self.seq,
                chunks=self._buffer, last=last,
            )  # fmt: skip
            self.seq += 1
            self._buffer, self.due_at = [], None
            self.ended = last
            return self._publisher.send(self, part)

    def end(self) -> Any:
        return self.flush(last=True)

    def abandon(self) -> None:
        """No end to send (the request failed: its error answer ends the reader's stream)."""
        with self._lock:
            self.ended, self._buffer, self.due_at = True, [], None


class StreamPublisher:
    def __init__(
        self,
        producer,
        worker_id: str,
        interval_s: float = STREAM_INTERVAL_S,
        max_chunks: int = MAX_CHUNKS,
        on_record: Callable[[str, int], None] | None = None,
    ):
        """producer: a producer transport, not the one that sends responses (an exactly-once worker's
        is transactional, and its records would be seen only at commit). on_record(variant, chunks) per record."""
        self.producer, self.worker_id = producer, worker_id
        self.interval_s, self.max_chunks = interval_s, max_chunks
        self.on_record = on_record
        self._attempts = itertools.count()
        self._cond = threading.Condition()
        self._waiting: set[ChunkStream] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="abq-streams", daemon=True)
        self._thread.start()

    def new_attempt(self) -> str:
        return f"{self.worker_id}.{next(self._attempts)}"

    def open(self, topic: str, key: bytes, request_id: str, caller_tag: str | None, variant: str) -> ChunkStream:
        return ChunkStream(self, topic, key, request_id, caller_tag, variant)

    def schedule(self, stream: ChunkStream) -> None:
        with self._cond:
            self._waiting.add(stream)
            self._cond.notify()

    def send(self, stream: ChunkStream, part: StreamPart) -> Any:
        try:
            result = self.producer.send(stream.topic, stream.key, encode_part(part), [(KIND_HEADER, STREAM_KIND)])
        except Exception as e:  # the whole answer still comes on the responses topic; the stream stops here
            log.warning(
                "request %s: could not stream to %s (%s); it is answered whole", part.request_id, stream.topic, e
            )
            stream.ended = True
            return None
        if self.on_record is not None:
            self.on_record(stream.variant, len(part.chunks))
        return result

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    due = [s for s in self._waiting if s.due_at is None or s.due_at <= now]
                    if due:
                        break
                    self._cond.wait(min(s.due_at for s in self._waiting if s.due_at) - now if self._waiting else None)
                self._waiting.difference_update(due)
            for s in due:
                s.flush()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self.producer.close()
