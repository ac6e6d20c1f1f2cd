"""The GPU-shaped simulated engine (workers/engines/sim.py): its step model reproduces the H100
profile it cites, and it schedules like vLLM: at most max_num_seqs running, a KV budget, the rest
waiting inside the engine."""

from __future__ import annotations

import threading

import pytest

from schemas import InferenceRequest
from workers.engines.sim import SimEngine


def request(i: int, max_tokens: int = 8, words: int = 10) -> InferenceRequest:
    return InferenceRequest(experiment="e", routing_key=f"u{i}", prompt="w " * words, max_tokens=max_tokens)


@pytest.mark.parametrize("in_flight,published_req_per_s", [(8, 4.2), (128, 35.8), (192, 40.4)])
def test_the_default_step_model_gives_the_published_h100_rates(in_flight, published_req_per_s):
    # llm-d-async issue #261: Llama-3.1-8B on one H100, ~256-token outputs, c requests in flight.
    e = SimEngine()
    try:
        step = e.base_s + e.per_seq_s * in_flight
        assert in_flight / (256 * step) == pytest.approx(published_req_per_s, rel=0.06)
    finally:
        e.close()


def _run(engine: SimEngine, requests: list[InferenceRequest], timeout: float = 30.0):
    results, lock, all_done = {}, threading.Lock(), threading.Event()

    def done_for(r):
        def done(result):
            with lock:
                results[r.id] = result
                if len(results) == len(requests):
                    all_done.set()

        return done

    for r in requests:
        engine.submit(r, done_for(r))
    return results, all_done


def test_at_most_max_num_seqs_run_and_the_rest_wait_inside_the_engine():
    e = SimEngine(max_num_seqs=4, base_ms=2, per_seq_ms=0, prefill_ms_per_token=0)
    try:
        reqs = [request(i, max_tokens=20) for i in range(10)]
        results, all_done = _run(e, reqs)
        seen = []
        while not all_done.wait(0.005):
            seen.append(e.stats())
        assert max(s["running"] for s in seen) == 4
        assert max(s["waiting"] for s in seen) >= 5
        assert {r.completion_tokens for r in results.values()} == {20}
        assert e.stats() == {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "capacity": 4}
    finally:
        e.close()


def test_the_kv_budget_admits_fewer_long_requests():
    # Each request reserves 10 prompt + 40 output tokens: a 120-token budget runs two at a time.
    e = SimEngine(max_num_seqs=256, kv_tokens=120, base_ms=2, per_seq_ms=0, prefill_ms_per_token=0)
    try:
        results, all_done = _run(e, [request(i, max_tokens=40) for i in range(6)])
        seen = []
        while not all_done.wait(0.005):
            seen.append(e.stats())
        assert max(s["running"] for s in seen) == 2
        assert max(s["kv_cache_usage"] for s in seen) == pytest.approx(100 / 120)
        assert len(results) == 6
    finally:
        e.close()


def test_a_request_larger_than_the_kv_budget_is_refused_up_front():
    e = SimEngine(kv_tokens=100)
    try:
        assert e.check(request(0, max_tokens=200)).reason == "oversized_prompt"
        assert e.check(request(1, max_tokens=50)) is None
    finally:
        e.close()
