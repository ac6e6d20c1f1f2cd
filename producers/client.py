"""AbqClient: submit requests and wait for their responses (request-reply over Kafka)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from abqueue.errors import AbqError
from abqueue.kafka import KafkaSettings, ensure_topic
from producers.publisher import RequestPublisher
from producers.replies import Reply, ResponseListener
from schemas import ConfigError, ExperimentConfig, InferenceRequest
from schemas.body import CHAT, EMBEDDINGS


class ReplyTimeout(AbqError, TimeoutError):
    pass


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
    ):
        """reply_topic: where this client reads its answers, and the reply_to of every request it
        publishes (unless the request names its own); one of the experiment's reply topics, created
        here if missing and create_topics (the producer role may create its own). None: the
        experiment's responses topic.
        follow: take weights, overrides and new variants from the live config topic as they are applied.
        tag: this client's caller_tag (a fresh random one by default; a batch job keeps one across reruns).
        accept_untagged: also take responses without a tag, to requests published by other means."""
        self.experiment = experiment
        self.reply_to = reply_topic if reply_topic and reply_topic != experiment.response_topic else None
        if self.reply_to is not None:
            if refused := experiment.reply_to_refusal(self.reply_to):
                raise ConfigError(refused)
            if create_topics:
                ensure_topic(settings, self.reply_to, experiment.partitions)
        self.tag = tag or uuid.uuid4().hex
        self.accept_untagged = accept_untagged
        self.follower = None
        if follow:
            from abqueue.control.live_config import ConfigFollower

            self.follower = ConfigFollower(settings)
            self.follower.caught_up.wait(timeout=10)  # start from the live version, not the file's
        # The publisher first: it creates the experiment's topics, the responses topic among them.
        self.publisher = RequestPublisher(settings, experiment, create_topics, follow=self.follower)
        self.listener = ResponseListener(settings, reply_topic or experiment.response_topic, start_offsets)
        self._reading = threading.Lock()  # one thread reads the listener at a time
        self._state = threading.Lock()
        self._waiting: Counter[str] = Counter()  # ids callers wait for now
        self._arrived: dict[str, Reply] = {}  # their replies, read by another caller's thread

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

    def mine(self, reply: Reply) -> bool:
        tag = reply.response.caller_tag
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
                if self._reading.acquire(timeout=0.1):  # kafka-python's consumer is not thread-safe
                    try:
                        for reply in self.listener.poll(timeout_ms=100):
                            if not self.mine(reply):
                                continue
                            with self._state:
                                rid = reply.response.request_id
                                if self._waiting[rid] and rid not in self._arrived:
                                    self._arrived[rid] = reply
                    finally:
                        self._reading.release()
            self._collect(pending, got, on_reply)
        return got

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
