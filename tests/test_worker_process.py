"""The worker as a process: kill -9 and restart loses nothing; SIGTERM drains the batch in hand."""

import re
import signal
import time
from collections import Counter

from conftest import new_experiment
from kafka_helpers import committed, end_offsets, responses

from abqueue.kafka import ensure_topics
from producers import AbqClient
from schemas import InferenceRequest


def _publish(client, exp, n, prefix="r"):
    ids = []
    for i in range(n):
        req, _ = client.publish(
            InferenceRequest(experiment=exp.name, routing_key=f"{prefix}{i}", prompt=f"{prefix} {i}")
        )
        ids.append(req.id)
    client.publisher.flush()
    return ids


def _wait_log(proc, text, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log_path.read_text(errors="replace"):
            return
        assert proc.poll() is None, proc.log_path.read_text()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in worker log:\n" + proc.log_path.read_text()[-2000:])


def _wait_admitted(proc, n, timeout=60.0):
    """Waits until the worker's log says it admitted `n` requests in all (over however many polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        admitted = sum(
            int(k) for k in re.findall(r"admitted (\d+) requests", proc.log_path.read_text(errors="replace"))
        )
        if admitted >= n:
            return
        assert proc.poll() is None, proc.log_path.read_text()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"the worker did not admit {n} requests:\n" + proc.log_path.read_text()[-2000:])


def test_kill_9_mid_run_then_restart_answers_every_request_with_bounded_duplicates(settings, spawn_worker):
    max_inflight = 8
    exp = new_experiment(variants=(("a", 100),), partitions=2, latency_ms=50)
    ensure_topics(settings, exp)
    with AbqClient(settings, exp) as client:
        ids = _publish(client, exp, 300)
        first = spawn_worker(exp, "a", "--max-inflight", str(max_inflight))
        # Let it serve part of the backlog, then kill it without warning.
        partial = {}
        deadline = time.monotonic() + 60
        while len(partial) < 100 and time.monotonic() < deadline:
            for reply in client.listener.poll(timeout_ms=100):
                partial[reply.response.request_id] = reply
        first.kill()
        first.wait()
        assert 0 < len(partial) < 300
        spawn_worker(exp, "a", "--max-inflight", str(max_inflight))
        got = client.wait(set(ids) - set(partial), timeout=90)
    assert set(partial) | set(got) == set(ids), "a request was lost"
    all_responses = responses(settings, exp.response_topic, expect=300)
    counts = Counter(r.request_id for r in all_responses)
    duplicates = sum(c - 1 for c in counts.values())
    assert set(counts) == set(ids)
    # The duplicate window: responses published but not yet covered by a commit when the process
    # died: those answered above the oldest unanswered request, plus the last delivery. With equal
    # request times that is at most two rounds of max_inflight.
    assert duplicates <= 2 * max_inflight, duplicates
    print(f"\nkill -9: {duplicates} duplicate responses of 300 (window: {2 * max_inflight})")


def test_sigterm_mid_batch_publishes_and_commits_the_batch_then_exits_0(settings, spawn_worker):
    exp = new_experiment(variants=(("a", 100),), partitions=1, latency_ms=2000)
    ensure_topics(settings, exp)
    with AbqClient(settings, exp) as client:
        proc = spawn_worker(exp, "a", "--max-batch", "50", "--max-wait-ms", "300")
        _wait_log(proc, "serving")
        ids = _publish(client, exp, 20)
        _wait_admitted(proc, 20)  # the engine is busy with them now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.log_path.read_text()[-2000:]
        got = client.wait(set(ids), timeout=10)
    assert set(got) == set(ids)
    topic = exp.request_topic("a")
    assert committed(settings, exp.consumer_group("a"), topic) == end_offsets(settings, topic)
    log = proc.log_path.read_text()
    assert "received SIGTERM" in log and "stopped after" in log


def test_a_dead_engine_exits_the_worker_and_a_healthy_replica_answers_the_rest(settings, spawn_worker):
    exp = new_experiment(variants=(("a", 100),), partitions=1, latency_ms=20, dies_after=5)
    ensure_topics(settings, exp)
    topic = exp.request_topic("a")
    with AbqClient(settings, exp) as client:
        ids = _publish(client, exp, 30)
        dying = spawn_worker(exp, "a", "--max-inflight", "1")
        assert dying.wait(timeout=60) == 2, dying.log_path.read_text()[-2000:]
        log = dying.log_path.read_text()
        assert log.count("abq: error:") == 1 and "the engine died" in log
        answered = client.wait(set(ids), timeout=5)
        assert len(answered) == 5 and all(r.response.ok for r in answered.values()), "the backlog got error answers"
        assert committed(settings, exp.consumer_group("a"), topic) == {0: 5}
        spawn_worker(exp, "a", "--engine-arg", "dies_after=1000")  # a healthy replica
        rest = client.wait(set(ids) - set(answered), timeout=60)
    assert set(answered) | set(rest) == set(ids) and all(r.response.ok for r in rest.values())
