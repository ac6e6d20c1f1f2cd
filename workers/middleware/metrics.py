"""Metrics: Prometheus counters and histograms per experiment and variant (names in the README)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from workers.middleware import Middleware

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics(Middleware):
    def on_start(self, worker) -> None:
        reg: CollectorRegistry = worker.registry
        labels = ("experiment", "variant")
        self.requests = Counter("abq_requests", "Requests handled, by outcome (ok, error, expired, dead_letter)", (*labels, "outcome"), registry=reg)
        self.dead_letters = Counter("abq_dead_letters", "Records sent to the dead-letter topic, by reason", (*labels, "reason"), registry=reg)
        self.batch_size = Histogram("abq_batch_size", "Records per polled batch", labels, buckets=BATCH_BUCKETS, registry=reg)
        self.queue_wait = Histogram("abq_queue_wait_seconds", "Record timestamp to dequeue", labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.engine_time = Histogram("abq_engine_seconds", "Engine time per batch", (*labels, "model"), buckets=LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("abq_end_to_end_seconds", "Record timestamp to response safe in Kafka", labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.tokens = Counter("abq_tokens", "Tokens processed, by kind (prompt, completion)", (*labels, "model", "kind"), registry=reg)
        self.last_batch = Gauge("abq_last_batch_timestamp_seconds", "When the last batch was committed", labels, registry=reg)
        self._labels = (worker.experiment.name, worker.variant.name)

    def wrap_engine(self, worker, call):
        def timed(requests):
            start = time.perf_counter()
            try:
                return call(requests)
            finally:
                self.engine_time.labels(*self._labels, worker.engine.model).observe(time.perf_counter() - start)

        return timed

    def after_batch(self, worker, batch) -> None:
        now = time.time()
        exp, var = self._labels
        self.batch_size.labels(exp, var).observe(len(batch))
        for m in batch:
            self.queue_wait.labels(exp, var).observe(max(0.0, m.dequeued_at - m.enqueued_at))
            if m.dead_letter is not None:
                self.requests.labels(exp, var, "dead_letter").inc()
                self.dead_letters.labels(exp, var, m.dead_letter.reason).inc()
                continue
            resp = m.response
            outcome = "ok" if resp.error is None else ("expired" if resp.error.code == "expired" else "error")
            self.requests.labels(exp, var, outcome).inc()
            self.e2e.labels(exp, var).observe(max(0.0, now - m.enqueued_at))
            self.tokens.labels(exp, var, resp.model, "prompt").inc(resp.usage.prompt_tokens)
            self.tokens.labels(exp, var, resp.model, "completion").inc(resp.usage.completion_tokens)
        self.last_batch.labels(exp, var).set(now)
