"""AbqClient: submit requests and wait for their responses (request-reply over Kafka)."""

from __future__ import annotations

import time

from abqueue.errors import AbqError
from abqueue.kafka import KafkaSettings
from producers.publisher import RequestPublisher
from producers.replies import Reply, ResponseListener
from schemas import ExperimentConfig, InferenceRequest


class ReplyTimeout(AbqError, TimeoutError):
    pass


class AbqClient:
    """One experiment's producer plus a listener on its responses (or a `reply_to`) topic."""

    def __init__(
        self,
        settings: KafkaSettings,
        experiment: ExperimentConfig,
        reply_topic: str | None = None,
        start_offsets: dict[int, int] | None = None,
        create_topics: bool = True,
        follow: bool = False,
    ):
        """follow: take weights, overrides and new variants from the live config topic as they are applied."""
        self.experiment = experiment
        self.follower = None
        if follow:
            from abqueue.control.live_config import ConfigFollower

            self.follower = ConfigFollower(settings)
            self.follower.caught_up.wait(timeout=10)  # start from the live version, not the file's
        # The publisher first: it creates the experiment's topics, the responses topic among them.
        self.publisher = RequestPublisher(settings, experiment, create_topics, follow=self.follower)
        self.listener = ResponseListener(settings, reply_topic or experiment.response_topic, start_offsets)

    def submit(self, request: InferenceRequest, timeout: float = 60.0, traceparent: str | None = None) -> Reply:
        """Publish one request and block until its response arrives (or ReplyTimeout)."""
        request, future = self.publisher.publish(request, traceparent)
        future.get(timeout=timeout)
        replies = self.wait({request.id}, timeout)
        if request.id not in replies:
            raise ReplyTimeout(
                f"no response for request {request.id} within {timeout:g}s; is a worker running for "
                f"variant {request.variant} (`abq worker --variant {request.variant}`)?"
            )
        return replies[request.id]

    def wait(self, ids: set[str], timeout: float, on_reply=None) -> dict[str, Reply]:
        """Collect replies for `ids` until all came or `timeout` passed; the first reply per id wins."""
        pending, got = set(ids), {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.listener.poll(timeout_ms=100):
                rid = reply.response.request_id
                if rid in pending:
                    pending.discard(rid)
                    got[rid] = reply
                    if on_reply:
                        on_reply(reply)
        return got

    def close(self) -> None:
        if self.follower:
            self.follower.close()
        self.publisher.close()
        self.listener.close()

    def __enter__(self) -> AbqClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
