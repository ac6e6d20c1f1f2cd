"""ResponseSink: publishes responses and dead letters, and tells which of them Kafka has acknowledged.

A record Kafka would refuse for good must not come back forever (the batch would be rewound and
retried without end), so what cannot fit its topic is made to fit first: a response too large
becomes a `too_large` error response, a dead letter keeps only the first bytes of the original
key and value, and a `reply_to` topic that does not exist or is too small gets no copy (the response
on the responses topic says why, in `reply_error`). A failure stays with its record: what Kafka
acknowledged is never sent again.
"""

from __future__ import annotations

import logging
import time

from kafka.errors import (
    InvalidTopicError,
    KafkaError,
    ProducerFencedError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from abqueue.errors import AbqError
from abqueue.kafka import RECORD_OVERHEAD, record_size, tracing
from schemas import DeadLetter, ErrorInfo, encode
from workers.transport import Producer

log = logging.getLogger(__name__)

TOPIC_LIST_TTL_S = 30.0
MISS_RELIST_S = 1.0


class PublishFailed(RuntimeError):
    """A response's records could not be made (a reply topic could not be checked): try again later."""


class Fenced(AbqError):
    """Another producer took over this worker's transactional id: this one can never commit again."""


class TransactionFailed(RuntimeError):
    """The transaction was aborted: none of its responses or offsets count; consume them again."""


Rec = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]  # topic, key, value, headers

DEAD_LETTER_KEY_BYTES = 1024  # a dead letter's record key: the original's first bytes at most
REPLY_COPY_GONE = (UnknownTopicOrPartitionError, InvalidTopicError, TopicAuthorizationFailedError)


class ResponseSink:
    def __init__(
        self,
        producer: Producer,
        response_topic: str,
        deadletter_topic: str,
    ):
        self.response_topic = response_topic
        self.deadletter_topic = deadletter_topic
        self._producer = producer
        self._limits = producer.max_message_bytes([response_topic, deadletter_topic])
        self._topics: set[str] = set()
        self._topics_at = float("-inf")
        self._missed: dict[str, float] = {}  # when a topic was last listed again for not being there

    def _topic_exists(self, topic: str, fresh: bool = False) -> bool:
        # Listed again every TTL whatever it says, so a reply topic deleted after first use is noticed;
        # and on a miss, at most once a MISS_RELIST_S per topic: a client creates its reply topic just
        # before its first request, after this worker last listed them (its answers went to the
        # responses topic alone for up to the TTL, and the caller timed out).
        now = time.monotonic()
        missed = topic not in self._topics and now - self._missed.get(topic, float("-inf")) > MISS_RELIST_S
        if missed:
            self._missed[topic] = now
            if len(self._missed) > 10_000:  # bounded: a topic checked long ago is checked again anyway
                self._missed.clear()
        if fresh or missed or now - self._topics_at > TOPIC_LIST_TTL_S:
            try:
                self._topics = self._producer.topic_names()
            except Exception as e:  # a broker outage: publish again later, like an unacknowledged send
                raise PublishFailed(f"could not list topics to check reply_to {topic}: {e}") from e
            self._topics_at = time.monotonic()
        return topic in self._topics

    def _limit(self, topic: str) -> int:
        if topic not in self._limits:
            try:
                self._limits.update(self._producer.max_message_bytes([topic]))
            except Exception as e:  # a broker outage, as in _topic_exists
                raise PublishFailed(f"could not read reply_to {topic}'s max.message.bytes: {e}") from e
        return self._limits[topic]

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

    def _fit_dead_letter(self, m) -> tuple[bytes | None, bytes]:
        key = m.record.key
        if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:
            key = key[:DEAD_LETTER_KEY_BYTES]
        value = encode(m.dead_letter)
        limit = self._limits[self.deadletter_topic] - RECORD_OVERHEAD - len(key or b"")
        if len(value) > limit:
            letter = m.dead_letter
            if m.record.key is not None and len(m.record.key) > DEAD_LETTER_KEY_BYTES:
                letter = letter.model_copy(
                    update={"original_key_b64": DeadLetter.b64(key), "original_key_truncated": True}
                )
            original = letter.original_value()
            rest = len(encode(letter)) - len(letter.original_value_b64)
            # base64 makes 3 bytes into 4: keep what fits of the original, beside the rest of the letter.
            keep = max(0, (limit - rest) * 3 // 4 - 3)
            if keep < len(original):
                letter = letter.model_copy(
                    update={"original_value_b64": DeadLetter.b64(original[:keep]), "original_value_truncated": True}
                )
            m.dead_letter = letter
            value = encode(letter)
        return key, value

    def _reply_problem(self, topic: str, size: int) -> str | None:
        """Why a copy cannot go to `topic` (allowed by validation), or None."""
        if not self._topic_exists(topic):
            return f"reply_to topic {topic} does not exist; create it before naming it"
        limit = self._limit(topic)
        if size > limit:
            return f"the response of {size} bytes exceeds reply_to topic {topic}'s max.message.bytes of {limit}"
        return None

    def records(self, m) -> list[Rec]:
        """What Kafka must acknowledge before `m` counts as answered."""
        recs: list[Rec] = []
        if m.dead_letter is not None:
            recs.append((self.deadletter_topic, *self._fit_dead_letter(m), []))
        if m.response is None:
            return recs
        headers = [("abq-request-id", m.response.request_id.encode())]
        child = tracing.child_of(m.traceparent)
        if child:
            headers.append((tracing.HEADER, child.encode("ascii")))
        key = m.response_key()
        value = self._fit_response(m, key, headers)
        if m.reply_to and m.reply_to != self.response_topic:
            problem = self._reply_problem(m.reply_to, record_size(key, value, headers))
            if problem is None:
                return [*recs, (self.response_topic, key, value, headers), (m.reply_to, key, value, headers)]
            log.warning(
                "request %s: %s; the response goes to %s only", m.response.request_id, problem, self.response_topic
            )
            m.reply_to = None
            m.response = m.response.model_copy(update={"reply_error": problem})
            value = self._fit_response(m, key, headers)
        return [*recs, (self.response_topic, key, value, headers)]

    def send(self, batch) -> tuple[list, list]:
        """Sends what Kafka has not acknowledged of each message's answer and returns at once: each
        message keeps its sends in `sending` until `settle`. Returns (sent, [(message, error)] of
        those that could not be sent now: a reply topic could not be checked during an outage)."""
        sent, unsendable = [], []
        for m in batch:
            try:
                if m.outbox is None:
                    m.outbox = self.records(m)
            except PublishFailed as e:
                unsendable.append((m, e))
                continue
            m.sending = []
            for rec in m.outbox:
                try:
                    m.sending.append((rec, self._producer.send(*rec)))
                except KafkaError as e:  # e.g. no metadata for the topic within max.block.ms
                    m.sending.append((rec, _Failed(e)))
            sent.append(m)
        return sent, unsendable

    def settle(self, sending: list) -> tuple[list, list, list]:
        """(acknowledged, [(message, error)] refused, still out) of messages sent. What Kafka
        acknowledged leaves the message's outbox and is never sent again; a refused message keeps
        only the records it still owes."""
        acked, refused, out = [], [], []
        for m in sending:
            if not all(fut.is_done for _, fut in m.sending):
                out.append(m)
                continue
            errors = []
            for rec, fut in m.sending:
                try:
                    fut.get(timeout=0)
                    m.outbox.remove(rec)
                except KafkaError as e:
                    if rec[0] == m.reply_to and self._copy_gone(m, e):
                        m.outbox.remove(rec)
                    else:
                        errors.append(e)
            m.sending = []
            if errors:
                refused.append((m, errors[0]))
            else:
                acked.append(m)
        return acked, refused, out

    def flush(self, timeout: float) -> None:
        """Waits up to `timeout` for every send to be acknowledged or to fail."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as e:
            log.warning("responses still unacknowledged after %.0fs: %s", timeout, e)

    def _copy_gone(self, m, error: KafkaError) -> bool:
        """A reply copy that can never be delivered (its topic deleted since it was checked) is given
        up: the response is safe on the responses topic, and a copy is no reason to stall a partition."""
        try:
            gone = isinstance(error, REPLY_COPY_GONE) or not self._topic_exists(m.reply_to, fresh=True)
        except PublishFailed:
            return False
        if gone:
            log.warning("request %s: reply_to topic %s refused its copy (%s); it was dropped, the response "
                        "is on %s", m.response.request_id, m.reply_to, error, self.response_topic)  # fmt: skip
        return gone

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)


class _Failed:
    """A send that failed before it had a future."""

    is_done = True

    def __init__(self, error: KafkaError):
        self.error = error

    def get(self, timeout: float | None = None):
        raise self.error


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
            futures = [p.send(*rec) for m in batch for rec in self.records(m)]
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
            # A reply topic deleted since it was listed fails every transaction that names it: list
            # the topics afresh before the next one, which then leaves that copy out.
            self._topics_at = float("-inf")
            raise TransactionFailed(f"{type(e).__name__}: {e}") from e
