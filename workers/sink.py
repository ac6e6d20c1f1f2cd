"""ResponseSink: publishes a batch's responses and dead letters and waits until Kafka has them all."""

from __future__ import annotations

import logging

from kafka.errors import KafkaError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from kafkaio import KafkaSettings, producer
from producers import tracing
from schemas import encode

log = logging.getLogger(__name__)


class PublishFailed(RuntimeError):
    pass


class ResponseSink:
    def __init__(self, settings: KafkaSettings, response_topic: str, deadletter_topic: str,
                 attempts: int = 5, ack_timeout_s: float = 30.0):
        self.response_topic = response_topic
        self.deadletter_topic = deadletter_topic
        self.attempts = attempts
        self.ack_timeout_s = ack_timeout_s
        # Dead letters carry the original record plus context, so allow a bit more than one record.
        self._producer = producer(settings, max_request_size=4 * 1024 * 1024)

    def _records(self, batch):
        for m in batch:
            if m.dead_letter is not None:
                key = m.record.key
                yield self.deadletter_topic, key, encode(m.dead_letter), []
                continue
            req = m.request
            headers = [("abq-request-id", req.id.encode())]
            child = tracing.child_of(m.traceparent)
            if child:
                headers.append((tracing.HEADER, child.encode("ascii")))
            value = encode(m.response)
            yield self.response_topic, req.routing_key.encode(), value, headers
            if req.reply_to and req.reply_to != self.response_topic:
                yield req.reply_to, req.routing_key.encode(), value, headers

    def publish(self, batch) -> None:
        """Returns once every record is acknowledged (acks=all); raises PublishFailed otherwise."""
        pending = list(self._records(batch))

        def send_all():
            nonlocal pending
            futures = [(rec, self._producer.send(rec[0], key=rec[1], value=rec[2], headers=rec[3])) for rec in pending]
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
            Retrying(
                retry=retry_if_exception_type(PublishFailed), stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=0.2, max=5), reraise=True,
                before_sleep=lambda rs: log.warning("publish: %s; retry %d", rs.outcome.exception(), rs.attempt_number),
            )(send_all)
        except PublishFailed:
            raise
        except KafkaError as e:
            raise PublishFailed(str(e)) from e

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)
