"""Requests in, responses out, nothing lost: two variants, real broker, in-process workers."""

import functools
import math
import time
from collections import Counter

import pytest
from conftest import new_experiment
from kafka_helpers import committed, end_offsets, responses, wait_until

from abqueue.kafka import clients, ensure_topics, producer, tracing
from producers import AbqClient, RequestTooLarge, assign_variant
from producers.replies import ResponseListener
from schemas import InferenceRequest, InferenceResponse, encode
from schemas.response import Timings
from workers.engines.echo import _fraction
from workers.transport.kafka import KafkaConsumerTransport


def test_n_requests_over_two_variants_get_exactly_n_responses_from_the_assigned_variant(
    settings, experiment, thread_worker
):
    n, users = 400, 150
    with (
        thread_worker(experiment, "a", max_batch=16),
        thread_worker(experiment, "b", max_batch=16),
        AbqClient(settings, experiment) as client,
    ):
        sent = {}
        for i in range(n):
            req, _ = client.publish(
                InferenceRequest(
                    experiment=experiment.name,
                    routing_key=f"user-{i % users}",
                    prompt=f"question {i} from user {i % users}",
                    max_tokens=8,
                )
            )
            sent[req.id] = req
        client.publisher.flush()
        got = client.wait(set(sent), timeout=60)
        # Committed while the workers still serve (a drain's synchronous commit would hide a worker
        # that never commits on the hot path): up to the end of every partition that got requests.
        for v in ("a", "b"):
            topic = experiment.request_topic(v)
            wanted = {p: o for p, o in end_offsets(settings, topic).items() if o > 0}
            group = experiment.consumer_group(v)
            wait_until(lambda g=group, t=topic, w=wanted: committed(settings, g, t) == w, 10, f"commits of {v}")
    # The whole topic, not what the client kept (it drops duplicates): every id exactly once.
    counts = Counter(r.request_id for r in responses(settings, experiment.response_topic, expect=n))
    assert set(counts) == set(sent) and max(counts.values()) == 1, f"{sum(counts.values()) - n} duplicates"
    assert len(got) == n
    by_user = {}
    for rid, reply in got.items():
        resp, req = reply.response, sent[rid]
        assert resp.ok and resp.variant == req.variant == assign_variant(experiment, req.routing_key)
        assert resp.worker_id and resp.model == f"echo-{req.variant}"
        assert resp.outputs == [req.prompt] and resp.usage.prompt_tokens == len(req.prompt.split())
        assert resp.timings.enqueued <= resp.timings.dequeued <= resp.timings.finished
        by_user.setdefault(req.routing_key, set()).add(resp.variant)
    assert all(len(v) == 1 for v in by_user.values()), "a routing key landed on two variants"
    # Split over users (the unit of assignment) within 4 sigma of the weights.
    b_users = sum(1 for v in by_user.values() if v == {"b"})
    assert abs(b_users - users * 0.1) < 4 * math.sqrt(users * 0.1 * 0.9)


def test_traceparent_travels_from_producer_to_response(settings, experiment, thread_worker):
    parent = tracing.new_traceparent()
    with thread_worker(experiment, "a"), thread_worker(experiment, "b"), AbqClient(settings, experiment) as client:
        reply = client.submit(
            InferenceRequest(experiment=experiment.name, routing_key="u1", prompt="trace me"),
            timeout=30,
            traceparent=parent,
        )
    assert tracing.trace_id(reply.traceparent) == tracing.trace_id(parent)
    assert reply.traceparent != parent  # the worker's hop has its own span id


def test_reply_to_topic_gets_the_response_too(settings, experiment, thread_worker):
    from abqueue.kafka import admin_client

    reply_topic = f"abq.{experiment.name}.replies.me"
    admin = admin_client(settings)
    admin.create_topics({reply_topic: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
    admin.close()
    with (
        thread_worker(experiment, "a"),
        thread_worker(experiment, "b"),
        AbqClient(settings, experiment, reply_topic=reply_topic) as client,
    ):
        reply = client.submit(
            InferenceRequest(experiment=experiment.name, routing_key="u2", prompt="to me", reply_to=reply_topic),
            timeout=30,
        )
    assert reply.response.ok and reply.response.outputs == ["to me"]


def test_a_client_with_a_reply_topic_creates_it_and_has_its_requests_answered_there(
    settings, experiment, thread_worker
):
    """One setting does both: the client creates its reply topic (no command did, and workers may not)
    and names it as reply_to of what it submits (it listened there while workers answered elsewhere)."""
    from schemas import ConfigError

    mine = f"abq.{experiment.name}.replies.mine"
    with (
        thread_worker(experiment, "a"),
        thread_worker(experiment, "b"),
        AbqClient(settings, experiment, reply_topic=mine) as client,
    ):
        reply = client.submit(InferenceRequest(experiment=experiment.name, routing_key="u", prompt="hi"), timeout=30)
    assert reply.response.ok and reply.response.outputs == ["hi"]
    other = f"abq.{experiment.name}x.replies.mine"  # another experiment's: refused by the rule, not "does not exist"
    with pytest.raises(ConfigError, match="is not allowed: experiment .* allows reply topics matching"):
        AbqClient(settings, experiment, reply_topic=other)


def test_oversized_request_is_refused_at_the_producer_with_a_clear_error(settings, experiment):
    with (
        AbqClient(settings, experiment) as client,
        pytest.raises(RequestTooLarge, match=r"accepts at most 1048588 \(max.message.bytes\); shorten the prompt"),
    ):
        client.publish(InferenceRequest(experiment=experiment.name, routing_key="u", prompt="x" * 1_100_000))


def test_expired_requests_get_an_expired_error_response(settings, experiment, thread_worker):
    with AbqClient(settings, experiment) as client:
        req, fut = client.publish(
            InferenceRequest(
                experiment=experiment.name, routing_key="late", prompt="too late", deadline=time.time() + 0.2
            )
        )
        fut.get(10)
        wait_until(lambda: time.time() > req.deadline, 5, "the deadline passing")  # while no worker runs
        with thread_worker(experiment, "a"), thread_worker(experiment, "b"):
            reply = client.wait({req.id}, timeout=30)[req.id]
    assert reply.response.error.code == "expired" and reply.response.outputs == []
    assert reply.response.timings.started is None, "an expired request reached the engine"
    assert reply.response.usage.prompt_tokens == 0


def test_transient_engine_failures_are_retried_and_bad_requests_get_error_responses(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), transient_failures=1, error_rate=0.3)
    ensure_topics(settings, exp)
    with thread_worker(exp, "a", max_batch=8), AbqClient(settings, exp) as client:
        ids = set()
        for i in range(40):
            req, _ = client.publish(InferenceRequest(experiment=exp.name, routing_key=f"u{i}", prompt=f"p {i}"))
            ids.add(req.id)
        client.publisher.flush()
        got = client.wait(ids, timeout=60)
    assert len(got) == 40
    errors = [r.response for r in got.values() if not r.response.ok]
    assert 0 < len(errors) < 40  # error_rate picks requests by id, so some fail and the rest are served
    assert all(e.error.code == "engine_error" and "rehearsed failure" in e.error.message for e in errors)
    # Exactly the requests the engine fails by id; the one transient failure was retried, not answered.
    assert {e.request_id for e in errors} == {i for i in ids if _fraction(i) < 0.3}


def test_one_client_shared_by_threads_hands_each_caller_its_own_reply(settings, experiment, thread_worker):
    from concurrent.futures import ThreadPoolExecutor

    def caller(client, k):
        out = []
        for i in range(5):
            req = InferenceRequest(experiment=experiment.name, routing_key=f"t{k}-{i}", prompt=f"thread {k} asks {i}")
            out.append((req.prompt, client.submit(req, timeout=30).response))
        return out

    with (
        thread_worker(experiment, "a"),
        thread_worker(experiment, "b"),
        AbqClient(settings, experiment) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        results = [r for part in pool.map(lambda k: caller(client, k), range(8)) for r in part]
    assert len(results) == 40
    assert all(resp.ok and resp.outputs == [prompt] for prompt, resp in results)


def test_the_response_listener_reads_partitions_added_after_it_started(settings, experiment):
    from kafka import KafkaProducer
    from kafka.admin import NewPartitions

    from abqueue.kafka import admin_client
    from producers.replies import ResponseListener
    from schemas import InferenceResponse, encode

    topic = experiment.response_topic
    listener = ResponseListener(settings, topic, partitions_every_s=0.2)
    try:
        before = sum(end_offsets(settings, topic).values())
        admin = admin_client(settings)
        try:
            admin.create_partitions({topic: NewPartitions(total_count=4)})
        finally:
            admin.close()
        response = InferenceResponse(
            request_id="on-a-new-partition", experiment=experiment.name, variant="a", model="m", outputs=["x"],
            finish_reason="stop", timings={"enqueued": 1.0, "dequeued": 1.0, "finished": 2.0}, worker_id="w",
        )  # fmt: skip
        p = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        p.send(topic, value=encode(response), partition=3).get(timeout=10)
        p.close()
        got, deadline = [], time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            got = [r for r in listener.poll(timeout_ms=200) if r.response.request_id == "on-a-new-partition"]
        assert before == 0 and [r.partition for r in got] == [3]
    finally:
        listener.close()


@pytest.mark.parametrize("reader", ["worker", "reply listener"])
def test_fetches_park_briefly_while_records_flow_and_long_while_idle(settings, monkeypatch, reader):
    """kafka-python leaves a partition out of the next fetch while records of it wait to be read, and
    that fetch parks at the broker: a record landing there waited for the park to end (a worker's p99
    in bench/overhead.py was its fixed 100 ms park). While idle nothing is left out, and a long park
    saves the CPU and the broker's work of empty fetches. Read from kafka-python's own fetcher, so
    that a kafka-python that stops reading it there fails here, not silently."""
    monkeypatch.setattr(clients, "BUSY_FOR_S", 0.5)
    exp = new_experiment(variants=(("a", 100),), partitions=2)
    ensure_topics(settings, exp)
    if reader == "worker":
        topic = exp.request_topic("a")
        c = KafkaConsumerTransport(settings, exp.consumer_group("a"), client_id="park", max_poll_records=10)
        c.subscribe([topic], lambda _: None, lambda _: None)
        wait_until(
            lambda: c.poll(timeout_ms=100, max_records=10) == [] and c.assignment(), 60, "an assignment"
        )  # a first join can assign nothing; the topics are re-read every 10 s
        poll = functools.partial(c.poll, timeout_ms=100, max_records=10)
    else:
        topic = exp.response_topic
        c = ResponseListener(settings, topic)
        poll = lambda: list(c.poll(timeout_ms=100))  # noqa: E731
    p, now = producer(settings), Timings(enqueued=time.time(), dequeued=time.time(), finished=time.time())
    try:
        assert c.park.wait_ms == clients.IDLE_FETCH_WAIT_MS
        p.send(
            topic,
            encode(
                InferenceResponse(
                    request_id="r", experiment=exp.name, variant="a", model="m", worker_id="w", timings=now
                )
            ),
        )
        p.flush()
        got: list = []
        wait_until(lambda: got.extend(poll()) or got, 30, "the record")
        assert c.park.wait_ms == clients.BUSY_FETCH_WAIT_MS
        poll()
        assert c.park.wait_ms == clients.BUSY_FETCH_WAIT_MS  # an empty poll right after: still busy
        time.sleep(0.5)
        poll()
        assert c.park.wait_ms == clients.IDLE_FETCH_WAIT_MS
        if reader == "worker":  # a paused partition is a backlog waiting: left out of the fetch until resumed
            c.pause(*c.assignment())
            poll()
            assert c.park.wait_ms == clients.BUSY_FETCH_WAIT_MS
    finally:
        c.close()
        p.close()


def test_the_response_listener_rides_out_a_broker_that_answers_metadata_with_no_brokers(settings, experiment):
    """CI caught it: just after a broker came back from a 12 s freeze, its metadata listed no brokers,
    and the listener's periodic look for new partitions raised MetadataEmptyBrokerList out of poll(),
    failing every caller waiting on replies. It is transient: the next look, a little later, succeeds."""
    from kafka.errors import MetadataEmptyBrokerList

    from producers.replies import ResponseListener

    listener = ResponseListener(settings, experiment.response_topic, partitions_every_s=0.0)
    real, calls = listener._consumer.topics, []

    def empty_once():
        calls.append(1)
        if len(calls) == 1:
            raise MetadataEmptyBrokerList("brokers=[]")
        return real()

    listener._consumer.topics = empty_once
    try:
        assert list(listener.poll(timeout_ms=50)) == []  # no error out of poll
        list(listener.poll(timeout_ms=50))
        assert len(calls) == 2  # and the next poll looks again
    finally:
        listener.close()
