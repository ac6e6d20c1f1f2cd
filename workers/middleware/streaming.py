"""Streaming: a request whose body says `stream: true` gets a stream (workers/streams.py) before it
reaches the engine; an engine that makes chunks puts them there as it makes them, and one that answers
whole (a static batch, the sim engine, a hook that made a new request) is streamed its whole answer in
one go. Before the answers go to Kafka each stream's last part is sent and acknowledged, so that a
reader sees the end of a stream before the whole response that follows it on the same partition."""

from __future__ import annotations

import logging
import weakref

from prometheus_client import Counter, Gauge

from schemas.chunks import split
from workers.middleware import Middleware
from workers.streams import StreamPublisher

log = logging.getLogger(__name__)

END_ACK_TIMEOUT_S = 5.0


class Streaming(Middleware):
    def __init__(self, publisher: StreamPublisher):
        self.publisher = publisher
        self._open: weakref.WeakSet = weakref.WeakSet()

    def before_start(self, worker) -> None:
        labels = ("experiment", "variant")
        self.streams = Counter(
            "abq_streams", "Requests answered as a stream (stream: true)", labels, registry=worker.registry
        )
        self.open_streams = Gauge(
            "abq_streams_open", "Streams whose requests are with the engine now", ("experiment",),
            registry=worker.registry,
        )  # fmt: skip
        self.open_streams.labels(worker.experiment.name).set_function(lambda: len(self._open))
        self.chunks = Counter(
            "abq_stream_chunks", "OpenAI chunks streamed to reply topics", labels, registry=worker.registry
        )
        self.records = Counter(
            "abq_stream_records", "Kafka records that carried them (chunks are coalesced)", labels,
            registry=worker.registry,
        )  # fmt: skip
        experiment = worker.experiment.name

        def counted(variant: str, chunks: int) -> None:
            self.chunks.labels(experiment, variant).inc(chunks)
            self.records.labels(experiment, variant).inc()

        self.publisher.on_record = counted

    def before_batch(self, worker, batch) -> None:
        for m in batch:
            req = m.request
            if m.done or req is None or req.body is None or req.body.get("stream") is not True or not m.reply_to:
                continue
            m.stream = self.publisher.open(m.reply_to, m.response_key(), req.id, req.caller_tag, m.variant)
            req.stream_to(m.stream)
            self._open.add(m.stream)
            self.streams.labels(worker.experiment.name, m.variant).inc()

    def before_deliver(self, worker, ready) -> None:
        ends = []
        for m in ready:
            stream, m.stream = m.stream, None
            if stream is None:
                continue
            self._open.discard(stream)
            r = m.response
            if r is None or r.error is not None or r.body is None or m.request is None:
                stream.abandon()  # its error answer ends the reader's stream
                continue
            if stream.chunks == 0:
                asks = m.request.asks()
                for chunk in split(asks.endpoint, r.body, asks.include_usage):
                    stream.put(chunk)
            ends.append((m, stream.end()))
        for m, sent in ends:
            try:
                if sent is not None:
                    sent.get(timeout=END_ACK_TIMEOUT_S)
            except Exception as e:  # the reader then ends the stream from the whole answer
                log.warning("request %s: the end of its stream was not acknowledged (%s)", m.request.id, e)

    def after_stop(self, worker) -> None:
        self.publisher.close()
