"""Metrics: Prometheus counters, histograms and gauges per experiment and variant (docs/reference/metrics.md is generated from them)."""

from __future__ import annotations

import functools
import time
from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from schemas import PRIORITIES
from workers.middleware import Middleware
from workers.middleware.histograms import LoopHistogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics(Middleware):
    def before_start(self, worker) -> None:
        reg: CollectorRegistry = worker.registry
        labels = ("experiment", "variant")
        per_model = (*labels, "model")
        self.requests = PromCounter(
            "abq_requests",
            "Requests handled, by outcome (ok, error, expired, cancelled, dead_letter)",
            (*labels, "outcome"),
            registry=reg,
        )
        self.dead_letters = PromCounter(
            "abq_dead_letters", "Records sent to the dead-letter topic, by reason", (*labels, "reason"), registry=reg
        )
        self.batch_size = Histogram(
            "abq_batch_size",
            "Requests per engine call: a static batch, or requests admitted together to a continuous engine",
            labels,
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        # Observed per request by the worker loop alone: no lock per observation (histograms.py).
        self.queue_wait = LoopHistogram(
            "abq_queue_wait_seconds", "Record timestamp to dequeue", labels, buckets=LATENCY_BUCKETS, registry=reg
        )
        self.engine_time = LoopHistogram(
            "abq_engine_seconds",
            "Engine start to finish, per request",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.e2e = LoopHistogram(
            "abq_end_to_end_seconds",
            "Record timestamp to response safe in Kafka",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = LoopHistogram(
            "abq_time_to_first_token_seconds",
            "Engine start to first token",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.tpot = LoopHistogram(
            "abq_time_per_output_token_seconds",
            "Time per output token after the first",
            per_model,
            buckets=TOKEN_TIME_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = LoopHistogram(
            "abq_prompt_tokens", "Prompt tokens per request", per_model, buckets=TOKEN_BUCKETS, registry=reg
        )
        self.completion_tokens = LoopHistogram(
            "abq_completion_tokens",
            "Completion tokens per request (all samples)",
            per_model,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.tokens = PromCounter(
            "abq_tokens", "Tokens processed, by kind (prompt, completion)", (*per_model, "kind"), registry=reg
        )
        self.last_batch = Gauge(
            "abq_last_batch_timestamp_seconds", "When responses were last committed", labels, registry=reg
        )
        # Engine-wide figures are labelled with what the worker serves (a variant, or a pool); requests with
        # their own variant.
        self._exp = worker.experiment.name
        self._children: dict[tuple, object] = {}
        exp, var = self._exp, worker.serves
        model = worker.engine.model

        def gauge(name, doc, read, extra=(), values=()):
            g = Gauge(name, doc, (*labels, *extra), registry=reg)
            g.labels(exp, var, *values).set_function(read)
            return g

        gauge(
            "abq_startup_seconds",
            "Process start to ready (engine loaded and warmed up)",
            lambda: worker.startup_seconds or 0,
        )
        gauge("abq_inflight_requests", "Requests with the engine now", lambda: worker.inflight)
        gauge(
            "abq_group_rejoins",
            "Times this worker joined its group again, left holding no partitions while some had no owner",
            lambda: worker.membership.rejoins,
        )
        gauge(
            "abq_inflight_limit",
            "Requests the engine may be handed now (adaptive admission, at most --max-inflight)",
            lambda: worker.limit.current if worker.limit is not None else worker.max_inflight,
        )
        buffered = Gauge(
            "abq_buffered_requests",
            "Polled requests waiting for the engine, by priority",
            (*labels, "priority"),
            registry=reg,
        )
        for level in PRIORITIES:
            buffered.labels(exp, var, level).set_function(functools.partial(worker.admission.waiting, level))
        stats = getattr(worker.engine, "stats", None)
        if callable(stats):
            for key, name, doc in (
                ("running", "abq_engine_running_requests", "Requests the engine is running"),
                ("waiting", "abq_engine_waiting_requests", "Requests queued inside the engine"),
                ("kv_cache_usage", "abq_kv_cache_usage_ratio", "Share of the engine's KV cache in use (vLLM)"),
            ):
                gauge(name, doc, lambda key=key: stats().get(key, 0), ("model",), (model,))

    def wrap_engine(self, worker, call):
        def counted(requests, done):
            self._child(self.batch_size, worker.serves).observe(len(requests))
            call(requests, done)

        return counted

    def _child(self, metric, variant: str, *values):
        # labels() takes a lock and builds a key on every call: each labelled child is looked up once.
        key = (metric, variant, *values)
        if (found := self._children.get(key)) is None:
            found = self._children[key] = metric.labels(self._exp, variant, *values)
        return found

    def after_batch(self, worker, batch) -> None:
        now = time.time()
        child = self._child
        # Counters are added to once per batch: a counter's inc takes a lock, and a batch's requests
        # mostly share their labels.
        outcomes: Counter[tuple] = Counter()
        tokens: Counter[tuple] = Counter()
        for m in batch:
            var = m.variant
            child(self.queue_wait, var).observe(max(0.0, m.dequeued_at - m.enqueued_at))
            if m.dead_letter is not None:
                outcomes[(self.requests, var, "dead_letter")] += 1
                outcomes[(self.dead_letters, var, m.dead_letter.reason)] += 1
                continue
            resp = m.response
            outcome = (
                "ok"
                if resp.error is None
                else resp.error.code
                if resp.error.code in ("expired", "cancelled")
                else "error"
            )
            outcomes[(self.requests, var, outcome)] += 1
            child(self.e2e, var).observe(max(0.0, now - m.enqueued_at))
            if m.started is None:
                continue  # answered without the engine (expired)
            t, u, model = resp.timings, resp.usage, resp.model
            child(self.engine_time, var, model).observe(max(0.0, t.finished - m.started))
            if t.ttft_s is not None:
                child(self.ttft, var, model).observe(t.ttft_s)
            if t.tpot_s is not None:
                child(self.tpot, var, model).observe(t.tpot_s)
            child(self.prompt_tokens, var, model).observe(u.prompt_tokens)
            child(self.completion_tokens, var, model).observe(u.completion_tokens)
            tokens[(self.tokens, var, model, "prompt")] += u.prompt_tokens
            tokens[(self.tokens, var, model, "completion")] += u.completion_tokens
        for counts in (outcomes, tokens):
            for key, n in counts.items():
                child(*key).inc(n)
        for var in {m.variant for m in batch if m.dead_letter is None and m.started is not None}:
            child(self.last_batch, var).set(now)
