"""The worker loop on the stub transport: admission, backpressure, offsets, rebalances, publish
failures, drain, middleware and retries, in milliseconds each. What they claim about the loop's
logic, the real-broker tests (test_request_path, test_continuous, ...) claim end to end."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter

import pytest
from conftest import metric_values, new_experiment
from kafka import TopicPartition
from prometheus_client import generate_latest

from workers.engines import Completion, EngineError
from workers.middleware import Middleware
from workers.middleware.deadline import Deadline
from workers.middleware.engine_check import EngineCheck
from workers.middleware.metrics import Metrics
from workers.middleware.retries import Retries
from workers.middleware.validation import Validation


class ManualEngine:
    """A continuous engine whose requests finish when the test says so."""

    model = "manual"
    batching = "continuous"

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running: dict[int, tuple] = {}  # submission number -> (request, done)
        self._seq = itertools.count()
        self.most_running = 0
        self.aborted: list[str] = []

    def check(self, request):
        return None

    def warm_up(self) -> None:
        pass

    def submit(self, request, done) -> None:
        with self.cond:
            self.running[next(self._seq)] = (request, done)
            self.most_running = max(self.most_running, len(self.running))
            self.cond.notify_all()

    def wait_running(self, n: int, timeout: float = 5.0) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.running) >= n, timeout), (
                f"{len(self.running)} requests with the engine, expected {n}"
            )
            return [r for r, _ in self.running.values()]

    def abort(self, request) -> None:
        with self.cond:
            for key, (r, _) in list(self.running.items()):
                if r is request:
                    del self.running[key]
                    self.aborted.append(request.id)

    def finish(self, request_id: str) -> None:
        with self.cond:
            key = next(k for k, (r, _) in self.running.items() if r.id == request_id)
            request, done = self.running.pop(key)
        done(Completion(outputs=[request.prompt], finish_reason="stop", prompt_tokens=1, completion_tokens=1))

    def serve_until(self, done, what: str, timeout: float = 5.0) -> None:
        """Finishes whatever reaches the engine until `done()` holds, or fails naming `what`."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
            with self.cond:
                self.cond.wait_for(lambda: self.running, 0.1)
                running = [r for r, _ in self.running.values()]
            for r in running:
                self.finish(r.id)

    def close(self) -> None:
        pass


def fast_middleware(attempts: int = 3) -> list[Middleware]:
    return [Metrics(), Validation(), Deadline(), EngineCheck(), Retries(attempts=attempts, backoff_s=0.01)]


def test_requests_in_responses_out_and_offsets_committed_to_the_end(stub_worker):
    exp = new_experiment()
    with stub_worker(exp) as w:
        w.broker.wait_for(lambda: w.consumer.assignment(), what="the worker polling")  # idle: arrivals meet a poll
        sent = [w.send(routing_key=f"user-{i}") for i in range(20)]
        responses = w.wait_responses(20)
        w.broker.wait_for(
            lambda: (
                w.committed()
                == {
                    tp: end
                    for t in exp.request_topics("a").values()
                    for tp, end in w.broker.end_offsets(t).items()
                    if end
                }
            ),
            what="commits up to the end of every partition",
        )
    assert sorted(r.request_id for r in responses) == sorted(r.id for r in sent)
    assert all(r.ok and r.variant == "a" for r in responses)
    assert all(r.timings.enqueued <= r.timings.dequeued <= r.timings.started <= r.timings.finished for r in responses)


def test_commit_point_waits_for_the_lowest_unanswered_offset(stub_worker):
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp, engine=engine) as w:
        first, second, third = (w.send(prompt=f"p{i}") for i in range(3))
        engine.wait_running(3)
        engine.finish(third.id)
        engine.finish(second.id)
        w.wait_responses(2)
        assert w.committed().get(tp, 0) == 0, "committed past a request still with the engine"
        engine.finish(first.id)
        w.broker.wait_for(lambda: w.committed().get(tp) == 3, what="commit of all three")


def test_high_priority_overtakes_a_buffered_backlog(stub_worker):
    exp, engine = new_experiment(partitions=1), ManualEngine()
    with stub_worker(exp, engine=engine, max_inflight=2) as w:
        backlog = [w.send(prompt=f"normal {i}") for i in range(6)]
        engine.wait_running(2)
        urgent = w.send(priority="high", prompt="urgent")
        w.broker.wait_for(lambda: w.worker.admission.waiting("high") == 1, what="the urgent request buffered")
        assert w.worker.admission.waiting("normal") >= 1  # it really arrived behind a backlog
        engine.finish(backlog[0].id)
        running = engine.wait_running(2)
        assert urgent.id in {r.id for r in running}, "the next free slot did not go to the high-priority request"


class Buffered(Middleware):
    """Records how many polled records were buffered at each admission (before the pick)."""

    def __init__(self):
        self.most = 0

    def before_batch(self, worker, batch):
        self.most = max(self.most, worker.admission.waiting() + len(batch))


def test_backpressure_bounds_the_engine_and_pauses_full_levels(stub_worker):
    exp, engine, buffered = new_experiment(partitions=2), ManualEngine(), Buffered()
    with stub_worker(exp, engine=engine, max_inflight=4, max_batch=8, middleware=[buffered, *fast_middleware()]) as w:
        sent = [w.send(routing_key=f"user-{i}") for i in range(40)]
        answered = 0
        while answered < 40:
            running = engine.wait_running(min(4, 40 - answered))
            assert len(running) <= 4
            if answered == 0:
                w.broker.wait_for(lambda: w.consumer.paused(), what="full level paused")
            assert w.worker.admission.waiting("normal") <= 4  # the level's buffer never overflows
            for r in running:
                engine.finish(r.id)
                answered += 1
        responses = w.wait_responses(40)
    assert engine.most_running == 4
    assert buffered.most == 4, "a level buffered more than --max-inflight"
    assert Counter(r.request_id for r in responses) == Counter(r.id for r in sent)


def test_a_revoked_partition_is_left_to_its_next_owner(stub_worker):
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp, engine=engine) as w:
        sent = [w.send(prompt=f"p{i}") for i in range(2)]
        engine.wait_running(2)
        w.consumer.rebalance(revoke={tp}, assign=set())
        w.broker.wait_for(lambda: tp not in w.consumer.assignment(), what="revocation")
        for r in sent:
            engine.finish(r.id)
        w.broker.wait_for(lambda: w.worker.inflight == 0 and w.worker.runner._done.empty(), what="finished work taken")
        beat = w.worker._heartbeat
        w.broker.wait_for(lambda: w.worker._heartbeat > beat, what="one more pass of the loop")
        assert w.responses() == [], "responses published for a partition this worker no longer owns"
        w.consumer.rebalance(revoke=set(), assign={tp})  # it comes back: redo from the commit point
        for r in engine.wait_running(2):
            engine.finish(r.id)
        responses = w.wait_responses(2)
        w.broker.wait_for(lambda: w.committed().get(tp) == 2, what="commit after the redo")
    assert sorted(r.request_id for r in responses) == sorted(r.id for r in sent)


def test_unacknowledged_responses_are_published_again_and_committed_only_then(stub_worker):
    exp = new_experiment(partitions=1)
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp) as w:
        w.broker.fail_sends(times=1000, topic=exp.response_topic)
        sent = [w.send(prompt="only one") for _ in range(1)]
        w.broker.wait_for(lambda: w.broker.refused >= 3, what="a failed send, tried again")
        assert w.responses() == []
        assert w.committed().get(tp, 0) == 0, "committed a request whose response Kafka did not acknowledge"
        w.broker.clear_faults()
        responses = w.wait_responses(1)
        w.broker.wait_for(lambda: w.committed().get(tp) == 1, what="commit after the retry")
    assert [r.request_id for r in responses] == [sent[0].id]


def test_the_loop_keeps_serving_while_responses_wait_for_their_acknowledgement(stub_worker):
    """Publishing used to wait for acks=all on every delivery: half the loop's time went to waiting,
    and nothing was polled or answered meanwhile. Now a response is sent and the loop moves on; its
    offset is committed once Kafka acknowledges it."""
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp, engine=engine) as w:
        w.broker.hold_acks()
        first = w.send(prompt="first")
        engine.finish(engine.wait_running(1)[0].id)
        w.wait_responses(1)
        second = w.send(prompt="second")
        (running,) = engine.wait_running(1)
        assert running.id == second.id, "the loop waited for the first response's acknowledgement"
        engine.finish(second.id)
        w.wait_responses(2)
        time.sleep(0.05)
        assert w.committed().get(tp, 0) == 0, "committed a request whose response Kafka did not acknowledge"
        w.broker.release_acks()
        w.broker.wait_for(lambda: w.committed().get(tp) == 2, what="commit once acknowledged")
    assert [r.request_id for r in w.responses()] == [first.id, second.id]


def test_drain_finishes_what_the_engine_has_then_commits(stub_worker):
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    w = stub_worker(exp, engine=engine, max_inflight=3)
    with w:
        sent = [w.send(prompt=f"p{i}") for i in range(8)]
        running = engine.wait_running(3)
        w.worker.stop()
        for r in running:
            engine.finish(r.id)
        w.thread.join(timeout=5)
        assert not w.thread.is_alive()
    responses = w.responses()
    assert sorted(r.request_id for r in responses) == sorted(r.id for r in sent[:3])
    assert w.committed() == {tp: 3}
    assert w.consumer.closed


def test_retries_and_the_batch_size_metric_apply_to_the_continuous_engine(stub_worker):
    exp = new_experiment(partitions=1, transient_failures=2)
    with stub_worker(exp, middleware=fast_middleware(attempts=3)) as w:
        assert w.worker.engine.batching == "continuous"
        sent = w.send()
        (response,) = w.wait_responses(1)
        registry = w.worker.registry
    assert response.request_id == sent.id and response.ok, response.error
    assert registry.get_sample_value("abq_batch_size_count", {"experiment": exp.name, "variant": "a"}) >= 1
    assert registry.get_sample_value("abq_batch_size_sum", {"experiment": exp.name, "variant": "a"}) >= 1


def test_without_retries_the_same_transient_failure_is_an_error_response(stub_worker):
    exp = new_experiment(partitions=1, transient_failures=2)
    with stub_worker(exp, middleware=fast_middleware(attempts=1)) as w:
        w.send()
        (response,) = w.wait_responses(1)
    assert not response.ok and response.error.code == "engine_error"


class PoisonableEngine:
    """A static engine that fails a whole batch when one prompt in it is 'poison'."""

    model = "static"
    batching = "static"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def check(self, request):
        return None

    def warm_up(self) -> None:
        pass

    def generate(self, requests):
        self.batches.append(len(requests))
        if any(r.prompt == "poison" for r in requests):
            raise EngineError("this batch holds a poisonous request")
        return [Completion(outputs=[r.prompt], finish_reason="stop") for r in requests]

    def close(self) -> None:
        pass


def test_a_failing_static_batch_is_split_to_the_request_that_fails_it(stub_worker, stub_broker):
    exp, engine = new_experiment(partitions=1), PoisonableEngine()
    w = stub_worker(exp, engine=engine, middleware=fast_middleware(), max_batch=8, max_wait_ms=200)
    sent = [w.send(prompt="poison" if i == 5 else f"fine {i}") for i in range(8)]  # all there at the first poll
    with w:
        responses = {r.request_id: r for r in w.wait_responses(8)}
    assert engine.batches[0] == 8
    assert [i for i, r in enumerate(sent) if not responses[r.id].ok] == [5]
    assert responses[sent[5].id].error.code == "engine_error"
    assert len(engine.batches) <= 1 + 2 * 3  # a bisection, not one call per request


class Faulty(Middleware):
    def __init__(self):
        self.calls = Counter()

    def _fail(self, hook):
        self.calls[hook] += 1
        raise RuntimeError(f"faulty middleware in {hook}")

    def before_start(self, worker):
        self._fail("before_start")

    def before_batch(self, worker, batch):
        self._fail("before_batch")

    def wrap_engine(self, worker, call):
        self._fail("wrap_engine")

    def after_batch(self, worker, batch):
        self._fail("after_batch")


def test_a_raising_hook_is_logged_and_the_worker_keeps_serving(stub_worker, caplog):
    exp, faulty = new_experiment(), Faulty()
    with (
        caplog.at_level(logging.CRITICAL, logger="workers.middleware"),
        stub_worker(exp, middleware=[faulty, *fast_middleware()]) as w,
    ):
        sent = [w.send(routing_key=f"user-{i}") for i in range(5)]
        responses = w.wait_responses(5)
        w.broker.wait_for(lambda: faulty.calls["after_batch"] >= 1, what="after_batch called")
        assert w.thread.is_alive()
    assert sorted(r.request_id for r in responses) == sorted(r.id for r in sent)
    assert all(r.ok for r in responses)
    logged = caplog.text
    for hook in ("before_start", "before_batch", "after_batch"):
        assert f"Faulty failed in {hook}" in logged
    assert "Faulty failed to wrap the engine" in logged


def test_a_failing_validation_hook_never_hands_the_engine_an_undecoded_request(stub_worker):
    class BrokenValidation(Validation):
        def before_batch(self, worker, batch):
            raise RuntimeError("validation broke")

    exp = new_experiment(partitions=1)
    with stub_worker(exp, middleware=[Metrics(), BrokenValidation()]) as w:
        w.send()
        w.broker.wait_for(lambda: w.broker.records(exp.deadletter_topic), what="a dead letter")
        assert w.thread.is_alive()
    (letter,) = w.dead_letters()
    assert letter.reason == "unsupported" and "middleware failed" in letter.detail


@pytest.mark.parametrize("aborts", [1, 3])
def test_exactly_once_rewinds_an_aborted_transaction_and_answers_each_request_once(stub_worker, aborts):
    exp = new_experiment(partitions=2)
    with stub_worker(exp, delivery="exactly-once") as w:
        w.broker.fail_transactions(aborts)
        sent = [w.send(routing_key=f"user-{i}") for i in range(12)]
        responses = w.wait_responses(12)
        w.broker.wait_for(lambda: sum(w.committed().values()) == 12, what="all offsets committed")
    assert Counter(r.request_id for r in responses) == Counter(r.id for r in sent)
    assert w.producer.transactions["aborted"] == aborts


def test_one_transaction_carries_every_response_finished_while_the_last_one_committed(stub_worker):
    """Exactly-once used to commit a transaction per delivery, with the loop waiting on each commit:
    nothing was polled or handed to the engine meanwhile. Now the loop serves on while a transaction
    commits, and the next one carries all that finished in the meantime."""
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp, engine=engine, delivery="exactly-once") as w:
        w.broker.hold_commits()
        first = w.send(prompt="first")
        engine.finish(engine.wait_running(1)[0].id)
        w.broker.wait_for(lambda: w.broker.committing == 1, what="the first transaction committing")
        later = [w.send(prompt=f"later {i}") for i in range(4)]
        for r in engine.wait_running(4):  # the loop took them while the first commit waited
            engine.finish(r.id)
        time.sleep(0.05)
        assert w.responses() == [] and w.committed().get(tp, 0) == 0, "visible before its transaction committed"
        w.broker.release_commits()
        w.broker.wait_for(lambda: w.committed().get(tp) == 5, what="all five committed")
        assert w.producer.transactions["committed"] == 2, "the four later responses took more than one transaction"
    assert [r.request_id for r in w.responses()] == [first.id] + [r.id for r in later]


def test_no_transaction_is_begun_for_offsets_already_in_the_one_committing(stub_worker):
    """The commit point of the transaction in flight was reported again on every loop, and after
    it committed a second transaction carried the same offsets and no response: at low load every
    request cost two transactions."""
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp, engine=engine, delivery="exactly-once") as w:
        w.broker.hold_commits()
        w.send(prompt="only")
        engine.finish(engine.wait_running(1)[0].id)
        w.broker.wait_for(lambda: w.broker.committing == 1, what="the transaction committing")
        time.sleep(0.1)  # the loop comes round while it commits
        w.broker.release_commits()
        w.broker.wait_for(lambda: w.committed().get(tp) == 1, what="the commit")
        time.sleep(0.1)
        assert w.producer.transactions == {"committed": 1, "aborted": 0}


def test_a_loop_with_no_room_waits_for_its_transaction_instead_of_spinning(stub_worker):
    """With every slot taken by responses in a committing transaction and more requests buffered, the
    loop polled Kafka with no wait over and over (about 3,600 empty polls per 13,000 requests in a
    benchmark), burning the CPU the transaction and the broker needed."""
    exp = new_experiment(partitions=1)
    with stub_worker(exp, delivery="exactly-once", max_inflight=4) as w:
        w.broker.hold_commits()
        w.send(prompt="first")
        w.broker.wait_for(lambda: w.broker.committing == 1, what="the first transaction committing")
        for i in range(8):
            w.send(prompt=f"later {i}")
        w.broker.wait_for(lambda: len(w.worker.admission) > 0 and w.worker.delivery.unsent >= 4, what="no room left")
        polls, poll = [], w.consumer.poll
        w.consumer.poll = lambda timeout_ms, max_records: polls.append(timeout_ms) or poll(timeout_ms, max_records)
        time.sleep(0.5)
        w.consumer.poll = poll
        w.broker.release_commits()
        w.broker.wait_for(lambda: sum(w.committed().values()) == 9, what="all nine committed")
    assert len(polls) < 200, f"{len(polls)} polls in 0.5 s while nothing could be admitted"


def test_a_committing_transaction_leaves_the_engine_a_full_window_and_no_more(stub_worker):
    """The responses in the transaction in flight took the engine's room: while a transaction
    committed, the engine got only what that left of the window, and an exactly-once worker draining
    a backlog idled a third of the time (0.76x the at-least-once rate in bench/overhead.py). They are
    out of the worker's hands; what stays bounded is what it still holds."""
    exp, engine = new_experiment(partitions=1), ManualEngine()
    with stub_worker(exp, engine=engine, delivery="exactly-once", max_inflight=4) as w:
        w.broker.hold_commits()
        w.send(prompt="first")
        engine.finish(engine.wait_running(1)[0].id)
        w.broker.wait_for(lambda: w.broker.committing == 1, what="the first transaction committing")
        for i in range(8):
            w.send(prompt=f"later {i}")
        for r in engine.wait_running(4):  # a full window while the first one commits
            engine.finish(r.id)
        time.sleep(0.2)
        # ...and no more: four finished behind the one committing, the rest left in the buffer.
        assert not engine.running and w.worker.delivery.unsent == 4
        w.broker.release_commits()
        engine.serve_until(lambda: sum(w.committed().values()) == 9, "all nine committed")
    assert len(w.responses()) == 9


def _probe(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Stuck(Middleware):
    """Holds the loop inside before_batch until released, as a loop stuck in a hook would be."""

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def before_batch(self, worker, batch):
        self.inside.set()
        assert self.release.wait(10)


def test_probes_fail_liveness_while_the_loop_is_stuck_and_readiness_while_draining(stub_worker):
    from abqueue.localkafka.broker import free_port
    from workers.health import serve

    exp, engine, stuck = new_experiment(partitions=1), ManualEngine(), Stuck()
    w = stub_worker(exp, engine=engine, middleware=[stuck, *fast_middleware()], drain_timeout_s=30)
    w.consumer.max_poll_interval_s = 0.3
    port = free_port()
    server = serve(w.worker, port, host="127.0.0.1")
    try:
        with w:
            w.broker.wait_for(lambda: w.worker.ready()[0], what="ready")
            assert _probe(port, "/readyz")[0] == 200 and _probe(port, "/healthz")[0] == 200
            first = w.send(prompt="one")
            assert stuck.inside.wait(5)
            w.broker.wait_for(lambda: not w.worker.alive()[0], what="the stuck loop noticed", timeout=5)
            code, why = _probe(port, "/healthz")
            assert code == 503 and "limit 0s" in why and "loop last ran" in why
            stuck.release.set()
            engine.wait_running(1)
            w.broker.wait_for(lambda: w.worker.alive()[0], what="the loop running again")
            assert _probe(port, "/healthz")[0] == 200
            w.worker.stop()  # draining: the request with the engine is finished first
            assert _probe(port, "/readyz") == (503, "draining\n")
            assert _probe(port, "/healthz")[0] == 200
            engine.finish(first.id)
            w.thread.join(5)
    finally:
        server.shutdown()
    assert [r.request_id for r in w.responses()] == [first.id]


def test_drain_gives_up_after_its_cap_and_commits_only_what_was_answered(stub_worker):
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    w = stub_worker(exp, engine=engine, drain_timeout_s=0.3)
    with w:
        first, second = w.send(prompt="answered"), w.send(prompt="never finishes")
        engine.wait_running(2)
        engine.finish(first.id)
        w.wait_responses(1)
        w.worker.stop()
        w.thread.join(3)  # the cap, not the stuck request, decides when the worker leaves
        assert not w.thread.is_alive()
    assert [r.request_id for r in w.responses()] == [first.id] != [second.id]
    assert w.committed() == {tp: 1}, "the unanswered request must stay in Kafka for the next owner"


def test_a_rewound_partition_is_fetched_again_even_if_it_was_paused(stub_worker):
    # One partition, room for two with the engine and two buffered: the level fills and is paused.
    # An aborted transaction rewinds the partition; it must be resumed, or it stays paused until the
    # next rebalance and nothing of it is ever answered again.
    exp, engine = new_experiment(partitions=1), ManualEngine()
    with stub_worker(exp, engine=engine, delivery="exactly-once", max_inflight=2, max_batch=2) as w:
        sent = [w.send(prompt=f"p{i}") for i in range(10)]
        engine.wait_running(2)
        w.broker.wait_for(lambda: w.consumer.paused(), what="the full level paused")
        w.broker.fail_transactions(1)
        engine.serve_until(lambda: len(w.responses()) >= 10, "all 10 answered (the rewound partition stalled)")
    assert {r.request_id for r in w.responses()} == {r.id for r in sent}
    assert w.producer.transactions["aborted"] == 1


def test_a_fenced_exactly_once_worker_stops_instead_of_retrying_forever(stub_worker):
    from workers.delivery import Fenced

    exp = new_experiment(partitions=1)
    w = stub_worker(exp, delivery="exactly-once")
    with w:
        w.send()
        w.wait_responses(1)
        w.producer.fence()  # a replacement with the same transactional id has started
        w.send()
        w.thread.join(5)
        assert not w.thread.is_alive(), "a fenced worker kept running"
    assert isinstance(w.error, Fenced) and "transactional id" in str(w.error)
    assert len(w.responses()) == 1 and w.consumer.closed


def test_a_broker_outage_while_checking_a_reply_topic_is_ridden_out(stub_worker):
    exp = new_experiment(partitions=1)
    w = stub_worker(exp)
    w.broker.create_topic(f"abq.{exp.name}.replies.me")
    w.broker.unreachable = True  # the sink has not listed topics yet: its first look fails
    with w:
        sent = w.send(reply_to=f"abq.{exp.name}.replies.me")
        w.broker.wait_for(lambda: w.worker.delivery.unsent, what="the response held for a retry")
        assert w.thread.is_alive(), "the worker died of a broker outage"
        w.broker.unreachable = False
        (response,) = w.wait_responses(1)
        w.broker.wait_for(lambda: w.broker.records(f"abq.{exp.name}.replies.me"), what="the reply")
    assert response.request_id == sent.id and w.error is None


def test_responses_held_behind_a_slow_first_request_count_against_the_engine_s_room(stub_worker):
    # Exactly-once holds each response until every earlier offset of its partition is answered. If
    # held responses did not count, a slow first request would let the held pile grow without bound.
    exp, engine = new_experiment(partitions=1), ManualEngine()
    with stub_worker(exp, engine=engine, delivery="exactly-once", max_inflight=2) as w:
        slow, quick = w.send(prompt="slow"), w.send(prompt="quick")
        for i in range(6):
            w.send(prompt=f"more {i}")
        engine.wait_running(2)
        engine.finish(quick.id)  # answered, but held behind `slow`
        for _ in range(3):  # a few passes of the loop: nothing more may reach the engine
            beat = w.worker._heartbeat
            w.broker.wait_for(lambda beat=beat: w.worker._heartbeat > beat, what="a pass of the loop")
        assert [r.prompt for r, _ in engine.running.values()] == ["slow"]
        engine.finish(slow.id)
        engine.serve_until(lambda: len(w.responses()) >= 8, "all 8 answered")
    assert len(w.responses()) == 8


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_dead_engine_stops_the_worker_without_answering_or_committing_the_rest(stub_worker, batching):
    from workers.worker import EngineDied

    exp = new_experiment(partitions=1, dies_after=3, batching=batching)
    tp = TopicPartition(exp.request_topic("a"), 0)
    w = stub_worker(exp, middleware=fast_middleware(), max_batch=1, max_wait_ms=0)
    with w:
        sent = [w.send(prompt=f"p{i}") for i in range(10)]
        w.thread.join(5)
        assert not w.thread.is_alive(), "a worker with a dead engine kept running"
        assert not w.worker.ready()[0] and not w.worker.alive()[0]
        assert "engine is dead" in w.worker.ready()[1]
    assert isinstance(w.error, EngineDied)
    responses = w.responses()
    assert [r.request_id for r in responses] == [r.id for r in sent[:3]] and all(r.ok for r in responses)
    assert w.committed() == {tp: 3}, "committed past requests the dead engine never answered"


def test_a_draining_worker_still_takes_part_in_a_rebalance(stub_worker):
    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp, engine=engine, drain_timeout_s=30) as w:
        slow = w.send(prompt="slow")
        engine.wait_running(1)
        w.worker.stop()  # draining: waits for `slow`
        w.consumer.rebalance(revoke={tp}, assign=set())  # the group moves the partition meanwhile
        w.broker.wait_for(lambda: tp not in w.consumer.assignment(), what="the revocation during the drain")
        assert w.thread.is_alive()
        sent_more = w.send(prompt="fetched by no one here")
        engine.finish(slow.id)  # its partition has moved: the new owner answers it
        w.thread.join(5)
    assert w.responses() == [] and sent_more.id not in {r.id for r, _ in engine.running.values()}


def test_an_acknowledged_response_is_never_sent_again_while_its_reply_copy_fails(stub_worker):
    """A publish that half failed used to be redone whole every cycle: the acknowledged response
    went out again each time, while the partition stayed uncommitted."""
    exp = new_experiment(partitions=1)
    tp = TopicPartition(exp.request_topic("a"), 0)
    replies = f"abq.{exp.name}.replies.me"
    w = stub_worker(exp)
    w.broker.create_topic(replies)
    with w:
        w.broker.fail_sends(times=1000, topic=replies)
        first = w.send(prompt="first", reply_to=replies)
        w.broker.wait_for(lambda: w.broker.refused >= 4, what="the reply copy tried again")
        later = [w.send(prompt=f"later {i}") for i in range(3)]
        w.wait_responses(4)
        assert w.committed().get(tp, 0) == 0, "committed past a reply copy Kafka did not take"
        w.broker.clear_faults()
        w.broker.wait_for(lambda: w.committed().get(tp) == 4, what="commit once the copy landed")
    ids = Counter(r.request_id for r in w.responses())
    assert ids == Counter([first.id] + [r.id for r in later]), "a response went out more than once"
    assert len(w.broker.records(replies)) == 1


def test_a_reply_topic_that_is_gone_or_too_small_never_stalls_the_partition(stub_worker):
    """The caller learns why on the responses topic (reply_error); the partition moves on."""
    exp = new_experiment(partitions=1)
    tp = TopicPartition(exp.request_topic("a"), 0)
    small, doomed = f"abq.{exp.name}.replies.small", f"abq.{exp.name}.replies.doomed"
    w = stub_worker(exp)
    w.broker.create_topic(small, max_message_bytes=200)
    w.broker.create_topic(doomed)
    with w:
        to_small = w.send(prompt="a response larger than two hundred bytes", reply_to=small)
        before = w.send(prompt="before", reply_to=doomed)
        w.wait_responses(2)
        w.broker.delete_topic(doomed)  # after first use: the sink has seen it exist
        after = w.send(prompt="after", reply_to=doomed)
        w.wait_responses(3)
        w.broker.wait_for(lambda: w.committed().get(tp) == 3, what="the partition committed to its end")
    got = {r.request_id: r for r in w.responses()}
    assert set(got) == {to_small.id, before.id, after.id} and len(w.responses()) == 3
    assert all(r.ok for r in got.values())
    assert "max.message.bytes" in got[to_small.id].reply_error and small in got[to_small.id].reply_error
    assert got[before.id].reply_error is None
    assert w.broker.records(small) == []


def test_a_dead_letter_with_a_huge_key_is_made_to_fit(stub_worker):
    exp = new_experiment(partitions=1)
    tp = TopicPartition(exp.request_topic("a"), 0)
    with stub_worker(exp) as w:
        w.broker.produce(exp.request_topic("a"), b"not json", key=b"k" * 900_000)
        w.send(prompt="next")
        w.wait_responses(1)
        w.broker.wait_for(lambda: w.committed().get(tp) == 2, what="the partition moved on")
    [letter] = w.dead_letters()
    assert letter.reason == "not_json" and letter.original_key_truncated


def test_exactly_once_gets_past_a_reply_topic_deleted_after_first_use(stub_worker):
    """The same record used to abort every transaction until the topic list went stale (30 s)."""
    exp = new_experiment(partitions=1)
    tp = TopicPartition(exp.request_topic("a"), 0)
    doomed = f"abq.{exp.name}.replies.doomed"
    w = stub_worker(exp, delivery="exactly-once")
    w.broker.create_topic(doomed)
    with w:
        w.send(prompt="before", reply_to=doomed)
        w.wait_responses(1)
        w.broker.delete_topic(doomed)
        after = w.send(prompt="after", reply_to=doomed)
        w.broker.wait_for(lambda: w.committed().get(tp) == 2, timeout=3, what="the transaction past the gone topic")
    got = {r.request_id: r for r in w.responses()}
    assert f"reply_to topic {doomed} does not exist" in got[after.id].reply_error
    assert w.producer.transactions["aborted"] == 1


def test_a_request_the_engine_never_answers_times_out_and_stops_holding_its_partition(stub_worker):
    """Without a per-request timeout one stuck request held its partition's commit point, and an
    engine slot, for as long as the worker lived."""
    from workers.middleware.engine_timeout import EngineTimeout

    exp, engine = new_experiment(partitions=1), ManualEngine()
    tp = TopicPartition(exp.request_topic("a"), 0)
    middleware = [*fast_middleware()[:-1], EngineTimeout(0.3), fast_middleware()[-1]]
    with stub_worker(exp, engine=engine, middleware=middleware) as w:
        stuck, quick = w.send(prompt="stuck"), w.send(prompt="quick")
        engine.wait_running(2)
        engine.finish(quick.id)
        w.broker.wait_for(lambda: w.committed().get(tp) == 2, what="the commit past the stuck request")
        assert w.worker.inflight == 0
    got = {r.request_id: r for r in w.responses()}
    assert got[quick.id].ok
    err = got[stuck.id].error
    assert err.code == "engine_error" and "0.3s" in err.message and "--request-timeout" in err.message
    assert engine.aborted == [stuck.id]


def test_an_answered_call_leaves_nothing_of_its_messages_waiting_for_its_deadline():
    """Each engine call's deadline waits in a heap for --request-timeout (600 s by default) and held
    the runner's callback, and through it the call's messages (record, request and response): a
    worker draining a backlog grew by about 6 KB per request until the deadlines passed."""
    import gc
    import weakref

    from workers.middleware.engine_timeout import EngineTimeout

    class Messages:  # what the runner's callback holds
        pass

    messages = Messages()
    held = weakref.ref(messages)

    def call(requests, done):
        for i in range(len(requests)):
            done(i, "answered")

    timed = EngineTimeout(600).wrap_engine(worker=None, call=call)
    timed(["a request", "another"], lambda i, result, messages=messages: None)
    del messages
    gc.collect()
    assert held() is None, "a deadline still waiting keeps an answered call's messages alive"


def test_deadlines_of_answered_calls_do_not_pile_up_until_they_pass():
    """Every engine call left an entry in the deadline heap for --request-timeout (600 s by default):
    at thousands of calls a second, hundreds of MB before the first one passed."""
    from workers.middleware.engine_timeout import EngineTimeout

    mw = EngineTimeout(600)

    def call(requests, done):
        for i in range(len(requests)):
            done(i, "answered")

    timed = mw.wrap_engine(worker=None, call=call)
    for _ in range(20_000):
        timed(["a request"], lambda i, result: None)
    assert len(mw._deadlines) <= 2048, f"{len(mw._deadlines)} deadlines kept for 20,000 answered calls"


def test_the_loop_s_histograms_expose_what_prometheus_client_s_would():
    """The per-request histograms skip prometheus_client's locks; a scrape must not tell the difference."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from workers.middleware.histograms import LoopHistogram
    from workers.middleware.metrics import LATENCY_BUCKETS

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("abq_x_seconds", "doc", ("experiment", "variant"), buckets=LATENCY_BUCKETS, registry=theirs)
    loop = LoopHistogram("abq_x_seconds", "doc", ("experiment", "variant"), buckets=LATENCY_BUCKETS, registry=ours)
    # On a bound (le is inclusive), between bounds, beyond the last one, zero.
    values = [0.0, 0.005, 0.0051, 0.25, 1, 7.5, 600, 601, 1e9, 0.1]
    for i, v in enumerate(values):
        for h in (reference, loop):
            h.labels("e", "ab"[i % 2]).observe(v)

    def text(registry):
        return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)

    assert text(ours) == text(theirs)
    with pytest.raises(ValueError):
        loop.labels("only-one")


def test_a_worker_left_holding_nothing_that_no_one_else_holds_joins_its_group_again(stub_worker, caplog):
    # kafka-python once left a worker out of its group for good (CI, a three-node cluster: a broker
    # killed during its first join): 600 requests unanswered for three minutes.
    exp = new_experiment(partitions=2)
    with stub_worker(exp, stranded_after_s=0.3) as w:
        w.send(prompt="before")
        w.wait_responses(1)
        w.consumer.strand()
        w.broker.wait_for(lambda: not w.consumer.assignment(), what="the worker left holding nothing")
        later = w.send(prompt="while left out")
        with caplog.at_level(logging.WARNING, logger="workers.membership"):
            responses = w.wait_responses(2)
    assert later.id in {r.request_id for r in responses}
    assert w.consumer.rejoins == 1 and "joining the group again with a fresh consumer" in caplog.text
    assert metric_values(generate_latest(w.worker.registry).decode())["abq_group_rejoins"] == 1


def test_the_worker_logs_the_partitions_it_holds_after_a_rebalance(stub_worker, caplog):
    """It logged the partitions the callback named ("assigned 0 partitions") while serving three."""
    exp = new_experiment(variants=(("a", 100),), partitions=3)
    with stub_worker(exp) as w:
        w.broker.wait_for(lambda: len(w.consumer.assignment()) == 9, 5, "every partition assigned")  # 3 levels x 3
        with caplog.at_level(logging.INFO, logger="workers.worker"):
            w.worker._on_assigned(set())
            w.worker._on_assigned({TopicPartition(exp.request_topic("a", "normal"), 0)})
    lines = [r.getMessage() for r in caplog.records if "partitions" in r.getMessage()]
    assert lines == ["holding 9 partitions (0 newly assigned)", "holding 9 partitions (1 newly assigned)"]


class LateCancelReader:
    """A cancel reader that needs `after_s` to read the cancels sent before it started (a long
    backlog, or a broker slow to answer), as workers.cancels.CancelReader may."""

    def __init__(self, on_cancel, cancel, after_s: float):
        self.caught_up = threading.Event()

        def read() -> None:
            time.sleep(after_s)
            on_cancel(cancel)
            self.caught_up.set()

        threading.Thread(target=read, daemon=True).start()

    def close(self) -> None:
        pass


def test_no_request_reaches_the_engine_before_the_cancels_sent_ahead_of_it_are_read(stub_worker):
    """A worker started after a caller cancelled its queued request ran it anyway when its first
    poll beat the cancel reader's first read of the topic (CI: answered ok, not cancelled)."""
    from schemas.stream import Cancel

    exp = new_experiment(variants=(("a", 100),))
    cancel = Cancel(request_id="queued", caller_tag="tag", experiment=exp.name, at=time.time())
    w = stub_worker(exp, middleware=fast_middleware(), cancels=lambda on: LateCancelReader(on, cancel, 0.5))
    w.send(id="queued", caller_tag="tag")
    w.send(id="other", caller_tag="tag")
    with w:
        (first, second) = sorted(w.wait_responses(2), key=lambda r: r.request_id)
    assert first.request_id == "other" and first.ok
    assert second.request_id == "queued" and second.error.code == "cancelled" and second.timings.started is None
