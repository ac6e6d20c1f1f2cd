"""Continuous batching, backpressure, priorities and exactly-once delivery, against the real broker."""

import threading
import time
from collections import Counter

import pytest
from conftest import new_experiment
from kafka import TopicPartition
from kafka_helpers import committed, end_offsets, responses
from test_worker_process import _wait_log

from abqueue.kafka import ensure_topics
from producers import AbqClient
from schemas import InferenceRequest
from workers.offsets import OffsetTracker


def _publish(client, exp, n, prefix="r", words=lambda i: 1, partitions=None, **fields):
    """Publishes n requests; returns their ids in order. `partitions`, if given, gets id -> partition."""
    ids, sends = [], []
    for i in range(n):
        prompt = " ".join([f"{prefix}{i}"] * words(i))
        req, future = client.publish(
            InferenceRequest(experiment=exp.name, routing_key=f"{prefix}{i}", prompt=prompt, **fields)
        )
        ids.append(req.id)
        sends.append(future)
    client.publisher.flush()
    if partitions is not None:
        partitions.update({i: f.get(timeout=10).partition for i, f in zip(ids, sends, strict=True)})
    return ids


def test_offset_tracker_commits_only_up_to_the_lowest_unanswered_offset():
    tp = TopicPartition("t", 0)
    t = OffsetTracker()
    for off in (5, 6, 7, 9):  # 8 is a gap (a transaction marker, say): never seen, never waited for
        t.add(tp, off)
    assert t.release() == ([], {})  # nothing answered: the commit point stays at the first offset
    t.answer(tp, 7, "m7")
    t.answer(tp, 9, "m9")
    assert t.release() == ([], {})  # 5 is still unanswered
    t.answer(tp, 5, "m5")
    assert t.release() == (["m5"], {tp: 6})
    t.mark_committed({tp: 6})
    assert not t.answer(tp, 5, "again")  # answered twice: the second is not ours to deliver
    t.answer(tp, 6, "m6")
    assert t.release() == (["m6", "m7", "m9"], {tp: 10})
    t.mark_committed({tp: 10})
    t.forget([tp])
    assert not t.owns(tp, 10) and t.release() == ([], {})


def test_requests_finishing_out_of_order_are_all_answered_and_commits_never_pass_an_unanswered_one(
    settings, spawn_worker
):
    # Longer prompts take longer (ms_per_token), so a later short request finishes before an earlier long one.
    exp = new_experiment(variants=(("a", 100),), partitions=2, ms_per_token=40)
    ensure_topics(settings, exp)
    with AbqClient(settings, exp) as client:
        partition_of: dict[str, int] = {}
        ids = _publish(client, exp, 300, words=lambda i: 1 + (i * 7) % 25, partitions=partition_of)
        first = spawn_worker(exp, "a", "--max-inflight", "32")
        partial, order = {}, []
        deadline = time.monotonic() + 60
        while len(partial) < 120 and time.monotonic() < deadline:
            for reply in client.listener.poll(timeout_ms=100):
                partial[reply.response.request_id] = reply
                order.append(ids.index(reply.response.request_id))
        assert 0 < len(partial) < len(ids), "the kill must land mid-stream"
        first.kill()  # mid-stream, with requests of both partitions in flight
        first.wait()
        spawn_worker(exp, "a", "--max-inflight", "32")
        got = client.wait(set(ids) - set(partial), timeout=90)
    assert set(partial) | set(got) == set(ids), "a request was lost"
    # Within one partition (offset order = publish order), a later request finished before an earlier one.
    by_partition = {p: [i for i in order if partition_of[ids[i]] == p] for p in set(partition_of.values())}
    assert any(seq != sorted(seq) for seq in by_partition.values()), "no partition saw an out-of-order finish"
    topic = exp.request_topic("a")
    deadline = time.monotonic() + 10
    while (
        committed(settings, exp.consumer_group("a"), topic) != end_offsets(settings, topic)
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert committed(settings, exp.consumer_group("a"), topic) == end_offsets(settings, topic)


def test_backpressure_bounds_what_the_worker_holds_when_the_topic_holds_10x_max_inflight(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), partitions=2, latency_ms=20)
    ensure_topics(settings, exp)
    max_inflight, max_batch = 8, 8
    with AbqClient(settings, exp) as client:
        ids = _publish(client, exp, 10 * max_inflight * 3)
        held, done = [], threading.Event()
        with thread_worker(exp, "a", max_inflight=max_inflight, max_batch=max_batch) as worker:

            def sample():
                while not done.is_set():
                    held.append((worker.inflight, len(worker.admission), len(worker.delivery.tracker)))
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample)
            sampler.start()
            got = client.wait(set(ids), timeout=60)
            done.set()
            sampler.join()
    assert set(got) == set(ids)
    # At most max_inflight with the engine and max_inflight buffered (polls are sized to the room
    # left); everything tracked is one of those or just answered.
    assert max(h[0] for h in held) <= max_inflight
    assert max(h[1] for h in held) <= max_inflight  # as the README says: a level never buffers more
    assert max(h[2] for h in held) <= 2 * max_inflight + 2 * max_batch
    print(
        f"\nheld at most: {max(h[0] for h in held)} in flight, {max(h[1] for h in held)} buffered, "
        f"{max(h[2] for h in held)} tracked, for {len(ids)} requests in the topic"
    )


def test_high_priority_requests_submitted_after_a_batch_backlog_are_answered_first(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), partitions=2, latency_ms=30)
    ensure_topics(settings, exp)
    with AbqClient(settings, exp) as client:
        backlog = _publish(client, exp, 200, prefix="bulk", priority="batch")
        order = []
        with thread_worker(exp, "a", max_inflight=4):
            # The worker is busy with the backlog before the urgent requests exist.
            deadline = time.monotonic() + 30
            while len(order) < 10 and time.monotonic() < deadline:
                order += [r.response.request_id for r in client.listener.poll(timeout_ms=50)]
            before = len(order)
            assert 0 < before < 150, f"{before} of the backlog answered before the urgent requests: not a backlog"
            urgent = _publish(client, exp, 5, prefix="urgent", priority="high")
            client.wait(
                (set(backlog) | set(urgent)) - set(order),
                timeout=60,
                on_reply=lambda r: order.append(r.response.request_id),
            )
    assert sorted(order) == sorted(backlog + urgent)
    last_urgent = max(order.index(u) for u in urgent)
    overtaken = last_urgent - before - (len(urgent) - 1)  # backlog answered between publish and the last urgent one
    # What the engine and the batch level already held (4 + 4), the fetch of the high topic, and one
    # slot in ten for the batch level while high requests wait; far fewer than the ~150 left behind them.
    assert overtaken < 24, f"{overtaken} batch requests were answered before the last urgent one"
    assert len(order) - last_urgent - 1 > 100, "the urgent requests did not overtake the backlog"
    print(
        f"\nurgent requests published after {before} of 200 bulk ones were answered; {overtaken} bulk answered before the last urgent one"
    )


def test_lower_priorities_keep_their_share_of_engine_slots_while_higher_ones_wait():
    # Whether batch requests reach the engine before 5 high ones depends on fetch timing, so the
    # no-starvation rule is checked where it is decided, with every level full.
    from types import SimpleNamespace

    from workers.admission import Admission

    topics = {"high": "t.high", "normal": "t", "batch": "t.batch"}
    adm = Admission(topics, capacity=1000, low_share=0.1)
    for i in range(300):
        for level, topic in topics.items():
            adm.add([SimpleNamespace(record=SimpleNamespace(topic=topic), dequeued_at=float(i), level=level)])
    picked = [m.level for m in adm.pick(100)]
    assert picked.count("high") == 90  # strict priority for nine slots in ten
    assert picked.count("normal") + picked.count("batch") == 10  # every 10th to the longest-waiting lower level
    assert picked.count("batch") >= 4 and picked.count("normal") >= 4  # neither lower level is starved


def test_exactly_once_kill_9_mid_stream_then_restart_read_committed_sees_each_response_once(settings, spawn_worker):
    exp = new_experiment(variants=(("a", 100),), partitions=2, latency_ms=20, ms_per_token=5)
    ensure_topics(settings, exp)
    flags = ("--delivery", "exactly-once", "--max-inflight", "16")
    with AbqClient(settings, exp) as client:
        ids = _publish(client, exp, 300, words=lambda i: 1 + i % 9)
        first = spawn_worker(exp, "a", *flags)
        _wait_log(first, "serving")
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 100 and time.monotonic() < deadline:  # the client reads uncommitted: progress only
            seen += len(list(client.listener.poll(timeout_ms=100)))
        at_kill = sum(committed(settings, exp.consumer_group("a"), exp.request_topic("a")).values())
        first.kill()
        first.wait()
        assert seen > 0 and at_kill < len(ids), "the kill must land mid-stream"
        second = spawn_worker(exp, "a", *flags)
        topic = exp.request_topic("a")
        deadline = time.monotonic() + 90
        while (
            committed(settings, exp.consumer_group("a"), topic) != end_offsets(settings, topic)
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert second.poll() is None
    visible = responses(settings, exp.response_topic, expect=300, isolation_level="read_committed")
    counts = Counter(r.request_id for r in visible)
    assert set(counts) == set(ids), f"{len(set(ids) - set(counts))} requests have no committed response"
    assert max(counts.values()) == 1, f"{sum(c - 1 for c in counts.values())} duplicates under read_committed"
    everything = responses(settings, exp.response_topic, expect=300)
    print(
        f"\nexactly-once: {len(visible)} committed responses for 300 requests; "
        f"{len(everything) - len(visible)} more records from the aborted transaction are invisible to read_committed"
    )


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_second_worker_joining_mid_stream_takes_partitions_without_losing_a_request(
    settings, thread_worker, delivery
):
    """Exactly-once: a transaction may be in flight (the loop serves on while one commits) when
    the partitions move; each response is still visible to read_committed once."""
    exp = new_experiment(variants=(("a", 100),), partitions=4, latency_ms=200)  # 600 take >= 7.5 s on one worker
    ensure_topics(settings, exp)
    with AbqClient(settings, exp) as client:
        ids = _publish(client, exp, 600)
        seen = []
        with thread_worker(exp, "a", max_inflight=16, worker_id="first", delivery=delivery):
            client.wait(set(ids), timeout=1.5, on_reply=lambda r: seen.append(r.response))
            assert 0 < len(seen) < len(ids), "the second worker must join mid-stream"
            with thread_worker(exp, "a", max_inflight=16, worker_id="second", delivery=delivery):
                client.wait(
                    set(ids) - {r.request_id for r in seen}, timeout=60, on_reply=lambda r: seen.append(r.response)
                )
    assert {r.request_id for r in seen} == set(ids)
    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    visible = responses(settings, exp.response_topic, expect=len(ids), isolation_level=isolation)
    by_worker = Counter(r.worker_id for r in visible)
    assert by_worker["first"] > 0 and by_worker["second"] > 0, by_worker
    duplicates = len(visible) - len(ids)
    if delivery == "exactly-once":
        assert {r.request_id for r in visible} == set(ids) and duplicates == 0, f"{duplicates} duplicates"
    # In-flight work of a moved partition is dropped, not published: duplicates only come from
    # responses published just before the move whose commit had not landed.
    assert duplicates <= 16, f"{duplicates} duplicates"
    print(f"\nscale-up mid-stream ({delivery}): {dict(by_worker)}, {duplicates} duplicates")


def test_exactly_once_fences_a_frozen_worker_whose_slot_was_taken_over(settings, spawn_worker):
    import os
    import signal

    exp = new_experiment(variants=(("a", 100),), partitions=2, latency_ms=30)
    ensure_topics(settings, exp)
    flags = ("--delivery", "exactly-once", "--max-inflight", "8", "--worker-id", "slot-0")
    topic = exp.request_topic("a")
    with AbqClient(settings, exp) as client:
        ids = _publish(client, exp, 200)
        stale = spawn_worker(exp, "a", *flags)
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 30 and time.monotonic() < deadline:  # uncommitted reads: progress only
            seen += len(list(client.listener.poll(timeout_ms=100)))
        os.kill(stale.pid, signal.SIGSTOP)  # frozen mid-transaction, as a long GC pause or a partition looks
        try:
            at_freeze = sum(committed(settings, exp.consumer_group("a"), topic).values())
            assert seen > 0 and at_freeze < len(ids), "the freeze must land mid-stream"
            # Its replacement has the same transactional id: initialising it fences the stale one.
            spawn_worker(exp, "a", *flags)
            deadline = time.monotonic() + 90
            while committed(settings, exp.consumer_group("a"), topic) != end_offsets(settings, topic):
                assert time.monotonic() < deadline, "the replacement did not finish the backlog"
                time.sleep(0.5)
        finally:
            os.kill(stale.pid, signal.SIGCONT)  # it wakes up holding responses it can no longer commit
        deadline = time.monotonic() + 15
        while stale.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    visible = responses(settings, exp.response_topic, expect=len(ids), isolation_level="read_committed")
    counts = Counter(r.request_id for r in visible)
    assert set(counts) == set(ids), f"{len(set(ids) - set(counts))} requests have no committed response"
    assert max(counts.values()) == 1, f"{sum(c - 1 for c in counts.values())} duplicates under read_committed"
    print(
        f"\nfencing: the stale worker {'exited ' + str(stale.returncode) if stale.poll() is not None else 'still runs'}"
    )
