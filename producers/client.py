"""AbqClient: submit requests and wait for their responses (request-reply over Kafka)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from abqueue.errors import AbqError
from abqueue.kafka import KafkaSettings, ensure_topic
from producers.publisher import RequestPublisher
from producers.replies import Reply, ResponseListener
from schemas import ConfigError, ExperimentConfig, InferenceRequest
from schemas.body import CHAT, EMBEDDINGS, GENERATE
from schemas.chunks import split
from schemas.stream import Cancel, StreamPart


class ReplyTimeout(AbqError, TimeoutError):
    pass


class StreamError(AbqError):
    """A stream that ends without its answer: `code` says why (OpenAI's error code style), and
    `reply` is the request's error answer where that is what ended it."""

    def __init__(self, message: str, code: str, reply: Reply | None = None):
        super().__init__(message)
        self.code, self.reply = code, reply


Batches = Generator[list[dict[str, Any]], None, None]  # a stream's chunks, one record's at a time


class Stream(Iterator[dict[str, Any]]):
    """A streamed answer's OpenAI chunks as they come (iterate it, or take them a record at a time
    with next_chunks()); `cancel()` stops the request in the worker, `close()` stops reading it."""

    def __init__(self, client: AbqClient, request_id: str, batches: Batches):
        self.request_id, self._client, self._batches = request_id, client, batches
        self._ready: deque[dict[str, Any]] = deque()

    def __next__(self) -> dict[str, Any]:
        while not self._ready:
            self._ready.extend(next(self._batches))
        return self._ready.popleft()

    def next_chunks(self) -> list[dict[str, Any]]:
        """The chunks that came together (one record's, the worker's coalescing), at least one;
        StopIteration after the last. A server relaying them pays one wait per record, not per chunk."""
        while not self._ready:
            self._ready.extend(next(self._batches))
        out = list(self._ready)
        self._ready.clear()
        return out

    def cancel(self) -> None:
        self._client.cancel(self.request_id)

    def close(self) -> None:
        self._batches.close()


# A streamed answer's parts wait here until their reader takes them. A reader that falls this far
# behind is ended (StreamError "slow_reader"): the thread that reads the reply topic for everyone
# never waits for one slow reader.
MAX_BUFFERED_PARTS = 512


@dataclass
class _Parts:
    """The parts of one streamed answer that arrived and its reader has not taken yet."""

    items: deque = field(default_factory=deque)
    overflowed: bool = False


class AbqClient:
    """One experiment's producer plus a listener on its responses (or a `reply_to`) topic. One
    client may be shared by threads: `submit` and `wait` hand each caller its own replies.

    Request ids are the caller's to choose, so two callers can use the same ones (two batch jobs
    numbering lines 1..N). Every request a client publishes carries its `caller_tag`, which workers
    copy to the response, and a client takes only responses with its own tag."""

    def __init__(
        self,
        settings: KafkaSettings,
        experiment: ExperimentConfig,
        reply_topic: str | None = None,
        start_offsets: dict[int, int] | None = None,
        create_topics: bool = True,
        follow: bool = False,
        tag: str | None = None,
        accept_untagged: bool = False,
        max_buffered_parts: int = MAX_BUFFERED_PARTS,
    ):
        """reply_topic: where this client reads its answers, and the reply_to of every request it
        publishes (unless the request names its own); one of the experiment's reply topics, created
        here if missing and create_topics (the producer role may create its own). None: the
        experiment's responses topic.
        follow: take weights, overrides and new variants from the live config topic as they are applied.
        tag: this client's caller_tag (a fresh random one by default; a batch job keeps one across reruns).
        accept_untagged: also take responses without a tag, to requests published by other means.
        max_buffered_parts: a stream's records that may wait for its reader; one further behind is ended."""
        self.experiment = experiment
        self.reply_to = reply_topic if reply_topic and reply_topic != experiment.response_topic else None
        if self.reply_to is not None:
            if refused := experiment.reply_to_refusal(self.reply_to):
                raise ConfigError(refused)
            if create_topics:
                ensure_topic(settings, self.reply_to, experiment.partitions)
        self.tag = tag or uuid.uuid4().hex
        self.accept_untagged = accept_untagged
        self.max_buffered_parts = max_buffered_parts
        self.follower = None
        if follow:
            from abqueue.control.live_config import ConfigFollower

            self.follower = ConfigFollower(settings)
            self.follower.caught_up.wait(timeout=10)  # start from the live version, not the file's
        # The publisher first: it creates the experiment's topics, the responses topic among them.
        self.publisher = RequestPublisher(settings, experiment, create_topics, follow=self.follower)
        self.listener = ResponseListener(settings, reply_topic or experiment.response_topic, start_offsets)
        self._bookkeeping()

    def _bookkeeping(self) -> None:
        """What the threads sharing this client know of each other's replies."""
        self._reading = threading.Lock()  # one thread reads the listener at a time
        self._state = threading.Lock()
        self._news = threading.Condition(self._state)  # something arrived, or the reading thread let go
        self._waiting: Counter[str] = Counter()  # ids callers wait for now
        self._arrived: dict[str, Reply] = {}  # their replies, read by another caller's thread
        self._streams: dict[str, _Parts] = {}  # by request id: streams callers read now

    def submit(self, request: InferenceRequest, timeout: float = 60.0, traceparent: str | None = None) -> Reply:
        """Publish one request and block until its response arrives (or ReplyTimeout)."""
        with self.expecting({request.id}):  # before publishing: another thread may read the reply first
            request, future = self.publish(request, traceparent)
            future.get(timeout=timeout)
            replies = self.wait({request.id}, timeout)
        if request.id not in replies:
            raise ReplyTimeout(
                f"no response for request {request.id} within {timeout:g}s; is a worker running for "
                f"variant {request.variant} (`abq worker --variant {request.variant}`)?"
            )
        return replies[request.id]

    def call(self, endpoint: str, body: dict[str, Any], routing_key: str, timeout: float = 60.0, **envelope) -> Reply:
        """Send an OpenAI request body to `endpoint` (/v1/chat/completions, /v1/completions,
        /v1/embeddings, ...) and wait for its answer; `reply.response.body` is the OpenAI response
        body. envelope: abqueue's own request fields (priority, deadline, metadata, variant, id)."""
        request = InferenceRequest.model_validate(
            {
                **envelope,
                "experiment": self.experiment.name,
                "routing_key": routing_key,
                "endpoint": endpoint,
                "body": body,
            }
        )
        return self.submit(request, timeout)

    def chat(self, messages: list[dict[str, Any]], routing_key: str, timeout: float = 60.0, **body) -> Reply:
        """A chat completion: `body` takes any field of OpenAI's (tools, response_format, ...)."""
        return self.call(CHAT, {"messages": messages, **body}, routing_key, timeout)

    def embed(self, input: str | list[str], routing_key: str, timeout: float = 60.0, **body) -> Reply:
        """Embeddings of one text or a list of them, from an embedding variant."""
        return self.call(EMBEDDINGS, {"input": input, **body}, routing_key, timeout)

    def publish(self, request: InferenceRequest, traceparent: str | None = None):
        """Publish without waiting, tagged as this client's (and answered on its reply topic, where it
        has one); returns the assigned request and the send's future."""
        update: dict[str, str] = {"caller_tag": self.tag}
        if self.reply_to is not None and request.reply_to is None:
            update["reply_to"] = self.reply_to
        return self.publisher.publish(request.model_copy(update=update), traceparent)

    def feedback(
        self,
        request_id: str,
        thumbs: Literal["up", "down"] | None = None,
        score: float | None = None,
        comment: str | None = None,
    ) -> None:
        """Record what the user thought of a response (thumbs "up"/"down", a score, or both)."""
        from producers.feedback import publish_feedback
        from schemas import Feedback

        fb = Feedback(
            request_id=request_id,
            experiment=self.experiment.name,
            caller_tag=self.tag,
            thumbs=thumbs,
            score=score,
            comment=comment,
        )
        publish_feedback(self.publisher.settings, self.experiment, fb)

    def cancel(self, request_id: str, timeout: float = 10.0, wait: bool = True) -> None:
        """Cancel one of this client's requests: the worker that has it skips it if it has not run
        yet, or aborts it in the engine (vLLM frees its slot), within a second, and answers it
        `cancelled`. Only requests this client sent are touched (a cancel carries its caller tag); a
        cancel for a request already answered, or unknown, does nothing. wait: for Kafka to take it."""
        cancel = Cancel(request_id=request_id, caller_tag=self.tag, experiment=self.experiment.name, at=time.time())
        sent = self.publisher.send_cancel(cancel)
        if wait:
            sent.get(timeout=timeout)

    def mine(self, reply: Reply) -> bool:
        return self._takes(reply.response.caller_tag)

    def _takes(self, tag: str | None) -> bool:
        """Whether an answer or a stream's part with this caller_tag is this client's."""
        return tag == self.tag or (tag is None and self.accept_untagged)

    @contextlib.contextmanager
    def expecting(self, ids: set[str]) -> Iterator[None]:
        """Keep replies for `ids` that another thread reads. Threads that publish themselves and
        then `wait` publish inside this, so that a reply arriving before their `wait` is kept."""
        with self._state:
            self._waiting.update(ids)
        try:
            yield
        finally:
            with self._state:
                self._waiting.subtract(ids)
                for rid in ids:
                    if self._waiting[rid] <= 0:
                        del self._waiting[rid]
                        self._arrived.pop(rid, None)

    def wait(self, ids: set[str], timeout: float, on_reply=None) -> dict[str, Reply]:
        """Collect replies for `ids` until all came or `timeout` passed; the first reply per id wins.
        Safe to call from several threads at once: one of them reads the listener at a time and
        keeps the replies the others wait for, so no caller takes another's reply."""
        pending, got = set(ids), dict[str, Reply]()
        with self.expecting(set(ids)):
            deadline = time.monotonic() + timeout
            while pending:
                self._collect(pending, got, on_reply)
                if not pending or time.monotonic() >= deadline:
                    break
                self._read_or_wait()
            self._collect(pending, got, on_reply)
        return got

    def _read_or_wait(self) -> None:
        """Read the reply topic for every caller of this client, or, while another thread does,
        wait until it hands something out or lets go (kafka-python's consumer is not thread-safe)."""
        if not self._reading.acquire(blocking=False):
            with self._news:
                self._news.wait(0.1)
            return
        try:
            for item in self.listener.poll(timeout_ms=100):
                self._hand_out(item)
        finally:
            self._reading.release()
            with self._news:
                self._news.notify_all()

    def _hand_out(self, item: Reply | StreamPart) -> None:
        if isinstance(item, StreamPart):
            if not self._takes(item.caller_tag):
                return
            with self._news:
                parts = self._streams.get(item.request_id)
                if parts is None:
                    return
                if len(parts.items) >= self.max_buffered_parts:
                    parts.overflowed = True
                    parts.items.clear()
                else:
                    parts.items.append(item)
                self._news.notify_all()
            return
        if not self.mine(item):
            return
        with self._news:
            rid = item.response.request_id
            if self._waiting[rid] and rid not in self._arrived:
                self._arrived[rid] = item
                self._news.notify_all()

    def stream(self, request: InferenceRequest, timeout: float = 60.0) -> Stream:
        """Publish a chat or completions request with stream: true and yield OpenAI's chunk objects
        as the worker makes them (it publishes them to this client's reply topic, a few at a time).
        Ends after the last chunk; StreamError where the answer is an error, or where the stream
        broke after some of it was yielded (its worker died and another redid the request: the
        chunks of two attempts never mix), or where this reader fell too far behind; ReplyTimeout
        where no chunk or answer came for `timeout` seconds."""
        if self.reply_to is None and request.reply_to is None:
            raise ConfigError(
                f"streaming needs a reply topic: create the client with reply_topic="
                f"'{self.experiment.reply_topic_patterns[0].replace('*', 'NAME')}'"
            )
        if request.body is None or request.endpoint not in GENERATE:
            raise ConfigError("only chat and completions bodies stream; send the request with call() instead")
        request = request.model_copy(update={"body": {**request.body, "stream": True}})
        return Stream(self, request.id, self._streaming(request, timeout))

    def _streaming(self, request: InferenceRequest, timeout: float) -> Batches:
        with self._news:
            if request.id in self._streams:
                raise ConfigError(f"request {request.id} is already being streamed by this client; use a new id")
            self._streams[request.id] = parts = _Parts()
        try:
            with self.expecting({request.id}):
                request, future = self.publish(request)
                future.get(timeout=timeout)
                yield from self._stream_of(request, parts, timeout)
        finally:
            with self._news:
                self._streams.pop(request.id, None)

    def stream_chat(self, messages: list[dict[str, Any]], routing_key: str, timeout: float = 60.0, **body) -> Stream:
        """stream() of a chat completion: `body` takes any field of OpenAI's (stream_options, tools, ...)."""
        request = InferenceRequest.model_validate(
            {"experiment": self.experiment.name, "routing_key": routing_key, "endpoint": CHAT,
             "body": {"messages": messages, **body, "stream": True}}
        )  # fmt: skip
        return self.stream(request, timeout)

    def _stream_of(self, request: InferenceRequest, parts: _Parts, timeout: float) -> Batches:
        rid, asks = request.id, request.asks()
        attempt, seq, yielded = None, 0, False
        deadline = time.monotonic() + timeout
        while True:
            with self._news:
                part = parts.items.popleft() if parts.items else None
                overflowed, reply = parts.overflowed, self._arrived.get(rid)
            if overflowed:
                raise StreamError(
                    f"request {rid}: this reader fell more than {self.max_buffered_parts} records behind its stream",
                    "slow_reader",
                )
            if part is not None:
                if part.attempt != attempt:
                    if yielded:
                        raise StreamError(
                            f"request {rid}: the worker streaming it stopped and another redid it; what was "
                            "streamed so far is not all of the answer, retry the request",
                            "stream_interrupted",
                        )
                    attempt, seq = part.attempt, 0
                if part.seq != seq:
                    raise StreamError(f"request {rid}: part {seq} of its stream never came", "stream_incomplete")
                seq += 1
                deadline = time.monotonic() + timeout
                if part.chunks:
                    yielded = True
                    yield part.chunks
                if part.last:
                    return
                continue
            if reply is not None:
                resp = reply.response
                if resp.error is not None:
                    raise StreamError(f"request {rid}: {resp.error.message}", resp.error.code, reply)
                if yielded or resp.body is None:
                    raise StreamError(
                        f"request {rid}: its stream ended early; the whole answer is on the responses topic",
                        "stream_incomplete",
                        reply,
                    )
                yield split(asks.endpoint, resp.body, asks.include_usage)  # a worker that did not stream it
                return
            if time.monotonic() >= deadline:
                raise ReplyTimeout(
                    f"nothing of request {rid} came within {timeout:g}s; is a worker running for "
                    f"variant {request.variant} (`abq worker --variant {request.variant}`)?"
                )
            self._read_or_wait()

    def _collect(self, pending: set[str], got: dict[str, Reply], on_reply) -> None:
        with self._state:
            mine = [self._arrived.pop(rid) for rid in list(pending) if rid in self._arrived]
        for reply in mine:
            pending.discard(reply.response.request_id)
            got[reply.response.request_id] = reply
            if on_reply:
                on_reply(reply)

    def close(self) -> None:
        if self.follower:
            self.follower.close()
        self.publisher.close()
        self.listener.close()

    def __enter__(self) -> AbqClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
