"""ResponseSink: publishes a batch's responses and dead letters and waits until Kafka has them all.

A record Kafka would refuse for good must not come back forever (the batch would be rewound and
retried without end), so what cannot fit its topic is made to fit first: a response too large
becomes a `too_large` error response, a dead letter keeps only the first bytes of the original
value, and a `reply_to` topic that does not exist is skipped (the responses topic still gets it).
"""

from __future__ import annotations

import logging
import time

from kafka.errors import KafkaError, ProducerFencedError

from abqueue.errors import AbqError
from abqueue.kafka import RECORD_OVERHEAD, record_size, tracing
from schemas import DeadLetter, ErrorInfo, encode
from workers.backoff import retrying
from workers.transport import Producer

log = logging.getLogger(__name__)

TOPIC_LIST_TTL_S = 30.0


class PublishFailed(RuntimeError):
    pass


class Fenced(AbqError):
    """Another producer took over this worker's transactional id: this one can never commit again."""


class TransactionFailed(RuntimeError):
    """The transaction was aborted: none of its responses or offsets count; consume them again."""


class ResponseSink:
    def __init__(
        self,
        producer: Producer,
        response_topic: str,
        deadletter_topic: str,
        attempts: int = 5,
        ack_timeout_s: float = 30.0,
    ):
        self.response_topic = response_topic
        self.deadletter_topic = deadletter_topic
        self.attempts = attempts
        self.ack_timeout_s = ack_timeout_s
        self._producer = producer
        self._limits = producer.max_message_bytes([response_topic, deadletter_topic])
        self._topics: set[str] = set()
        self._topics_at = float("-inf")

    def _topic_exists(self, topic: str) -> bool:
        if topic not in self._topics and time.monotonic() - self._topics_at > TOPIC_LIST_TTL_S:
            try:
                self._topics = self._producer.topic_names()
            except Exception as e:  # a broker outage: publish again later, like an unacknowledged send
                raise PublishFailed(f"could not list topics to check reply_to {topic}: {e}") from e
            self._topics_at = time.monotonic()
        return topic in self._topics

    def _fit_response(self, m, key: bytes, headers) -> bytes:
        value = encode(m.response)
        size = record_size(key, value, headers)
        limit = self._limits[self.response_topic]
        if size > limit:
            log.warning(
                "response to %s is %d bytes, over %s's limit of %d; sending an error instead",
                m.response.request_id,
                size,
                self.response_topic,
                limit,
            )
            m.response = m.response.model_copy(
                update={
                    "outputs": [],
                    "finish_reason": "error",
                    "error": ErrorInfo(
                        code="too_large",
                        message=f"the response of {size} bytes exceeds topic {self.response_topic}'s "
                        f"max.message.bytes of {limit}; lower n or max_tokens",
                    ),
                }
            )
            value = encode(m.response)
        return value

    def _fit_dead_letter(self, m) -> bytes:
        value = encode(m.dead_letter)
        limit = self._limits[self.deadletter_topic] - RECORD_OVERHEAD - len(m.record.key or b"")
        if len(value) > limit:
            original = m.dead_letter.original_value()
            # base64 makes 3 bytes into 4: keep what fits of the original, beside the rest of the letter.
            keep = max(0, (limit - (len(value) - len(m.dead_letter.original_value_b64))) * 3 // 4 - 3)
            m.dead_letter = m.dead_letter.model_copy(
                update={"original_value_b64": DeadLetter.b64(original[:keep]), "original_value_truncated": True}
            )
            value = encode(m.dead_letter)
        return value

    def _records(self, batch):
        for m in batch:
            if m.dead_letter is not None:
                yield self.deadletter_topic, m.record.key, self._fit_dead_letter(m), []
            if m.response is None:
                continue
            headers = [("abq-request-id", m.response.request_id.encode())]
            child = tracing.child_of(m.traceparent)
            if child:
                headers.append((tracing.HEADER, child.encode("ascii")))
            key = (m.routing_key or m.response.request_id).encode()
            value = self._fit_response(m, key, headers)
            yield self.response_topic, key, value, headers
            if m.reply_to and m.reply_to != self.response_topic:
                if self._topic_exists(m.reply_to):
                    yield m.reply_to, key, value, headers
                else:
                    log.warning(
                        "reply_to topic %s of request %s does not exist; the response went to %s only",
                        m.reply_to,
                        m.response.request_id,
                        self.response_topic,
                    )

    def publish(self, batch) -> None:
        """Returns once every record is acknowledged (acks=all); raises PublishFailed otherwise."""
        pending = list(self._records(batch))

        def send_all():
            nonlocal pending
            futures = [(rec, self._producer.send(*rec)) for rec in pending]
            self._producer.flush(timeout=self.ack_timeout_s)
            failed = []
            for rec, fut in futures:
                try:
                    fut.get(timeout=self.ack_timeout_s)
                except KafkaError as e:
                    failed.append((rec, e))
            if failed:
                pending = [rec for rec, _ in failed]
                raise PublishFailed(f"{len(failed)} of {len(futures)} records not acknowledged: {failed[0][1]}")

        try:
            retrying("publish", PublishFailed, self.attempts)(send_all)
        except PublishFailed:
            raise
        except KafkaError as e:
            raise PublishFailed(str(e)) from e

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)


class TransactionalSink(ResponseSink):
    """Exactly-once: a batch's responses and its consumed offsets commit in one Kafka transaction,
    so a reader with isolation.level=read_committed sees each response once, whatever crashes."""

    def __init__(self, producer: Producer, response_topic: str, deadletter_topic: str):
        """producer: one made with a transactional id."""
        super().__init__(producer, response_topic, deadletter_topic)
        self._producer.init_transactions()

    def publish_with_offsets(self, batch, offsets, group_metadata) -> None:
        p = self._producer
        try:
            p.begin_transaction()
            futures = [p.send(*rec) for rec in self._records(batch)]
            p.send_offsets_to_transaction(offsets, group_metadata)
            p.commit_transaction()
            for f in futures:
                f.get(timeout=0)
        except (KafkaError, PublishFailed) as e:
            fatal = e if isinstance(e, ProducerFencedError) else p.fatal_error()
            if isinstance(fatal, ProducerFencedError):
                # Retrying can never succeed, and the replacement alone must commit from here on.
                raise Fenced(
                    "another worker took over this worker's transactional id (a replacement with the same "
                    "--worker-id started); stopping so that only it commits; restart this one to rejoin"
                ) from e
            try:
                p.abort_transaction()
            except KafkaError:
                pass
            raise TransactionFailed(f"{type(e).__name__}: {e}") from e
