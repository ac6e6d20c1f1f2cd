"""Streamed answers through Kafka on the real broker: a worker publishes OpenAI chunks to the caller's
reply topic as the engine makes them, coalesced into a few records, and the whole answer to the
responses topic as for every request; AbqClient.stream yields the chunks."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import REPO, abq_cmd, new_experiment, write_config
from kafka_helpers import read_all, wait_until
from test_gateway import _client as sdk_client
from test_gateway import serving

from abqueue.kafka import ensure_topics
from abqueue.kafka.acls import reply_prefix
from producers.client import AbqClient, StreamError
from schemas import InferenceRequest, decode_response
from schemas.body import CHAT, COMPLETIONS
from schemas.chunks import join, text_of
from schemas.stream import decode_part, is_part

WORDS = " ".join(f"w{i}" for i in range(40))


def _reply_topic(exp, name="t"):
    return f"{reply_prefix(exp, 'tests')}{name}"


def _chat(exp, text=WORDS, rid=None, **body):
    return InferenceRequest.model_validate(
        {"experiment": exp.name, "routing_key": "u1", "endpoint": CHAT, **({"id": rid} if rid else {}),
         "body": {"messages": [{"role": "user", "content": text}], **body}}
    )  # fmt: skip


def test_chunks_arrive_as_made_coalesced_and_add_up_to_the_whole_answer(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=20)
    ensure_topics(settings, exp)
    topic = _reply_topic(exp)
    with thread_worker(exp, "a"), AbqClient(settings, exp, reply_topic=topic) as client:
        arrivals, chunks = [], []
        for chunk in client.stream(
            _chat(exp, rid="s1", stream=True, stream_options={"include_usage": True}), timeout=30
        ):
            arrivals.append(time.monotonic())
            chunks.append(chunk)
        # 40 words at 20 ms: the first chunk comes at once, the last ~0.8 s later.
        assert arrivals[-1] - arrivals[0] > 0.5, arrivals
        assert text_of(CHAT, chunks) == WORDS
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 40
        whole = join(CHAT, chunks)
        assert whole["choices"][0]["message"]["content"] == WORDS
        assert whole["choices"][0]["finish_reason"] == "stop"

        # The responses topic has the whole answer, as for any request; the reply topic has the
        # stream's parts (a record per ~50 ms, not per chunk) and then the same whole answer.
        responses = [decode_response(r.value) for r in read_all(settings, exp.response_topic)]
        (resp,) = [r for r in responses if r.request_id == "s1"]
        assert resp.body["choices"][0]["message"]["content"] == WORDS and resp.body["usage"]["completion_tokens"] == 40
        on_reply = read_all(settings, topic)
        parts = [decode_part(r.value) for r in on_reply if is_part(r.headers)]
        assert [p.seq for p in parts] == list(range(len(parts))) and parts[-1].last
        assert sum(len(p.chunks) for p in parts) == len(chunks)
        assert 3 <= len(parts) <= len(chunks) // 2, f"{len(parts)} records for {len(chunks)} chunks"
        (partition,) = {r.partition for r in on_reply if is_part(r.headers)}
        last = [r for r in on_reply if r.partition == partition][-1]
        assert not is_part(last.headers), "the whole answer follows the stream's end on its partition"

        # A relay (the gateway) takes the chunks a record at a time: one wait per record.
        stream, batches = client.stream(_chat(exp, rid="s2"), timeout=30), []
        with pytest.raises(StopIteration):
            while True:
                batches.append(stream.next_chunks())
        sent = [decode_part(r.value) for r in read_all(settings, topic) if is_part(r.headers)]
        assert [len(b) for b in batches] == [len(p.chunks) for p in sent if p.request_id == "s2" and p.chunks]
        assert text_of(CHAT, [c for b in batches for c in b]) == WORDS


def test_n_choices_and_completions_stream_and_a_static_engine_streams_its_whole_answer(settings, thread_worker):
    exp = new_experiment(variants=(("a", 50), ("b", 50)))
    exp.variants[1].engine_args["batching"] = "static"
    ensure_topics(settings, exp)
    topic = _reply_topic(exp)
    with thread_worker(exp, "a"), thread_worker(exp, "b"), AbqClient(settings, exp, reply_topic=topic) as client:
        two = list(client.stream(_chat(exp, "one two three", n=2).model_copy(update={"variant": "a"}), timeout=30))
        whole = join(CHAT, two)
        assert [c["message"]["content"] for c in whole["choices"]] == ["one two three"] * 2
        completion = InferenceRequest(
            experiment=exp.name, routing_key="u", variant="b", endpoint=COMPLETIONS,
            body={"prompt": "four five", "max_tokens": 1},
        )  # fmt: skip
        chunks = list(client.stream(completion, timeout=30))
        assert {c["object"] for c in chunks} == {"text_completion"}
        assert (
            text_of(COMPLETIONS, chunks) == "four"
            and join(COMPLETIONS, chunks)["choices"][0]["finish_reason"] == "length"
        )


def test_concurrent_streams_with_the_same_ids_from_two_callers_never_cross(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=2)
    ensure_topics(settings, exp)
    got: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []
    with (
        thread_worker(exp, "a"),
        AbqClient(settings, exp, reply_topic=_reply_topic(exp, "x")) as one,
        AbqClient(settings, exp, reply_topic=_reply_topic(exp, "x")) as two,  # one topic, two callers
    ):

        def run(c: int, client: AbqClient, i: int) -> None:
            try:
                got[(c, i)] = text_of(CHAT, list(client.stream(_chat(exp, _said(c, i), rid=f"r{i}"), timeout=60)))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(c, cl, i)) for i in range(30) for c, cl in ((1, one), (2, two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
    assert not errors, errors[:3]
    assert got == {(c, i): _said(c, i) for i in range(30) for c in (1, 2)}


def _said(caller: int, i: int) -> str:
    return " ".join([f"caller {caller} request {i}", *["word"] * (i % 7)])


def test_a_stream_without_a_reply_topic_is_refused_in_one_line(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    with AbqClient(settings, exp) as client:
        with pytest.raises(Exception, match="streaming needs a reply topic"):
            client.stream(_chat(exp))
        # Published by other means, the worker refuses it: its chunks would go to every reader's topic.
        with thread_worker(exp, "a"):
            reply = client.submit(_chat(exp, stream=True), timeout=30)
    assert reply.response.error is not None and "needs a reply_to topic" in reply.response.error.message


def test_an_error_answer_ends_the_stream_with_its_error(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), error_rate=1.0)
    ensure_topics(settings, exp)
    with (
        thread_worker(exp, "a"),
        AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client,
        pytest.raises(StreamError) as e,
    ):
        list(client.stream(_chat(exp), timeout=30))
    assert e.value.code == "engine_error" and e.value.reply is not None


# -- the gateway: server-sent events to the official openai SDK ---------------------------------------


def test_the_sdk_streams_through_the_gateway_as_from_openai(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=20)
    ensure_topics(settings, exp)
    with thread_worker(exp, "a"), serving(settings, [exp]) as url:
        client = sdk_client(url)
        whole = client.chat.completions.create(model=exp.name, messages=[{"role": "user", "content": WORDS}])
        arrivals, chunks = [], []
        with client.chat.completions.create(
            model=exp.name, messages=[{"role": "user", "content": WORDS}], stream=True,
            stream_options={"include_usage": True},
        ) as stream:  # fmt: skip
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert stream.response.headers["x-abq-variant"] == "a"
            for chunk in stream:
                arrivals.append(time.monotonic())
                chunks.append(chunk)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content == WORDS
        assert arrivals[-1] - arrivals[0] > 0.5  # the first event came long before the last
        assert chunks[-1].usage.completion_tokens == 40 and chunks[-2].choices[0].finish_reason == "stop"
        completion = "".join(
            c.choices[0].text for c in client.completions.create(model=exp.name, prompt="a b c", stream=True)
        )
        assert completion == "a b c"
        # A request refused before anything streamed is answered with its status, as a whole one is.
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=10**6
            )
        assert "exceeds the variant's limit" in e.value.message


def test_200_concurrent_streams_through_two_gateway_replicas_are_each_whole_and_uncrossed(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=1)
    ensure_topics(settings, exp)
    with (
        thread_worker(exp, "a"),
        serving(settings, [exp], instance="one") as one,
        serving(settings, [exp], instance="two") as two,
    ):
        clients = [sdk_client(one, max_retries=0), sdk_client(two, max_retries=0)]

        def stream(i: int) -> str:
            said = f"stream {i} " + " ".join(["w"] * (i % 13))
            out = clients[i % 2].chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": said}], stream=True, user=f"u{i}"
            )
            return "".join(c.choices[0].delta.content or "" for c in out if c.choices)

        with ThreadPoolExecutor(200) as pool:
            got = list(pool.map(stream, range(200)))
    assert got == [" ".join([f"stream {i}", *["w"] * (i % 13)]) for i in range(200)]


# -- cancellation -------------------------------------------------------------------------------------


def _metric(worker, name, **labels):
    return sum(
        s.value
        for fam in worker.registry.collect()
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_cancelled_request_queued_behind_a_backlog_never_reaches_the_engine(settings, thread_worker):
    # One at a time, each answer a second long: the third request waits behind two.
    exp = new_experiment(variants=(("a", 100),), partitions=1, ms_per_token=100)
    ensure_topics(settings, exp)
    with (
        thread_worker(exp, "a", max_inflight=1) as worker,
        AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client,
        AbqClient(settings, exp, reply_topic=_reply_topic(exp, "other")) as other,
    ):
        ids = ["first", "second", "third"]
        with client.expecting(set(ids)):
            for rid in ids:
                client.publish(_chat(exp, " ".join(["w"] * 10), rid=rid))
            other.cancel("second")  # another caller's cancel, with the same id: it touches nothing
            client.cancel("third")
            replies = client.wait(set(ids), timeout=30)
    assert {rid: r.response.error.code if r.response.error else "ok" for rid, r in replies.items()} == {
        "first": "ok", "second": "ok", "third": "cancelled",
    }  # fmt: skip
    third = replies["third"].response
    assert third.timings.started is None  # never started in the engine
    assert _metric(worker, "abq_cancels_total", stage="queued") == 1
    assert _metric(worker, "abq_requests_total", outcome="cancelled") == 1
    assert not third.counts_for_variant  # reports and rollouts leave it out


def test_a_cancel_aborts_a_running_stream_in_the_engine_within_a_second(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=50)
    ensure_topics(settings, exp)
    with (
        thread_worker(exp, "a") as worker,
        AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client,
    ):
        long = " ".join(["w"] * 400)  # 20 s of answer
        chunks = client.stream(_chat(exp, long, rid="long"), timeout=30)
        assert next(chunks)["choices"][0]["delta"]["role"] == "assistant"
        assert worker.engine.stats()["running"] > 0
        cancelled_at = time.monotonic()
        client.cancel("long")
        with pytest.raises(StreamError) as e:
            for _ in chunks:
                pass
        assert e.value.code == "cancelled" and time.monotonic() - cancelled_at < 1.5
        assert worker.engine.stats()["running"] == 0  # its remaining chunks and answer are dropped
        assert _metric(worker, "abq_cancels_total", stage="engine") == 1
        client.cancel("long")  # again, once answered: too late, and harmless
        wait_until(lambda: _metric(worker, "abq_cancels_total", stage="too_late") == 1, 5, "the late cancel counted")


def test_a_caller_that_goes_away_cancels_its_request_streaming_or_not(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=50)
    ensure_topics(settings, exp)
    long = " ".join(["w"] * 400)
    with thread_worker(exp, "a") as worker, serving(settings, [exp]) as url:
        with (
            sdk_client(url, max_retries=0).chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": long}], stream=True
            ) as stream,
        ):
            next(iter(stream))
        # Closing the stream closed the connection: the worker aborts the request in the engine.
        wait_until(lambda: _metric(worker, "abq_cancels_total", stage="engine") == 1, 5, "the stream cancelled")
        with pytest.raises(openai.APITimeoutError):
            sdk_client(url, max_retries=0, timeout=1.0).chat.completions.create(
                model=exp.name, messages=[{"role": "user", "content": long}]
            )
        wait_until(lambda: _metric(worker, "abq_cancels_total", stage="engine") == 2, 5, "the request cancelled")
        wait_until(lambda: worker.engine.stats()["running"] == 0, 5, "nothing left running")


def test_a_worker_killed_mid_stream_ends_a_started_stream_with_an_error_and_streams_an_unstarted_one_anew(
    settings, spawn_worker
):
    """The documented behaviour (README, Guarantees): a request is redone elsewhere after its worker
    dies; a stream that had sent nothing streams the new attempt, one that had sent chunks ends with
    an error event (a client never gets two attempts' chunks joined)."""
    exp = new_experiment(variants=(("a", 100),), partitions=1, ms_per_token=20)
    ensure_topics(settings, exp)
    unstarted: list = []
    with serving(settings, [exp]) as url, AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client:
        first = spawn_worker(exp, "a", "--max-inflight", "1")  # the second request waits behind the first
        started = sdk_client(url, max_retries=0).chat.completions.create(
            model=exp.name, messages=[{"role": "user", "content": " ".join(["w"] * 300)}], stream=True
        )
        head = next(iter(started))
        assert head.choices[0].delta.role == "assistant"

        def read_unstarted() -> None:
            try:
                unstarted.append(text_of(CHAT, list(client.stream(_chat(exp, "one two three", rid="u"), timeout=90))))
            except BaseException as e:
                unstarted.append(e)

        reader = threading.Thread(target=read_unstarted)
        reader.start()
        time.sleep(1.0)  # published and buffered by the first worker, behind the running one
        first.kill()
        spawn_worker(exp, "a")
        with pytest.raises(openai.APIError) as e:
            for _ in started:
                pass
        assert e.value.code == "stream_interrupted" and "retry the request" in e.value.message
        reader.join(timeout=90)
    assert unstarted == ["one two three"]


def test_a_slow_reader_is_ended_and_never_delays_another_stream(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=2)
    ensure_topics(settings, exp)
    with (
        thread_worker(exp, "a"),
        AbqClient(settings, exp, reply_topic=_reply_topic(exp), max_buffered_parts=4) as client,
    ):
        slow = client.stream(_chat(exp, " ".join(["w"] * 1000), rid="slow"), timeout=30)  # 2 s of chunks
        next(slow)  # ... and then this reader stops reading
        for i in range(5):  # meanwhile every other stream of the client flows: its first chunk at once
            asked = time.monotonic()
            fast = client.stream(_chat(exp, f"fast {i}", rid=f"fast-{i}"), timeout=30)
            next(fast)
            assert time.monotonic() - asked < 1.0
            assert text_of(CHAT, list(fast)) == f" {i}"
        time.sleep(2.5)
        with pytest.raises(StreamError) as e:
            list(slow)
    assert e.value.code == "slow_reader"


def test_abq_submit_stream_prints_tokens_as_they_come(settings, kafka_bootstrap, thread_worker, tmp_path):
    exp = new_experiment(variants=(("a", 100),), ms_per_token=100)
    ensure_topics(settings, exp)
    said = " ".join(f"t{i}" for i in range(12))  # 1.2 s of answer
    env = {**os.environ, "ABQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    cmd = abq_cmd("submit", "--config", str(write_config(exp, tmp_path)), "--routing-key", "u", "--stream")
    with thread_worker(exp, "a"):
        proc = subprocess.Popen(
            [*cmd, "--prompt", said], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
        )
        first = proc.stdout.read(2)
        first_at = time.monotonic()
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert time.monotonic() - first_at > 0.5  # the first token was printed long before the last
        assert (first + rest).decode() == said + "\n"
        refused = subprocess.run([*cmd, "--body", '{"input": "x"}', "--endpoint", "/v1/embeddings"],
                                 capture_output=True, text=True, env=env, cwd=REPO)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().startswith("abq: error: --stream is for chat")


def test_a_reply_topic_created_after_the_worker_last_listed_topics_gets_its_answers(settings, thread_worker):
    """A new client creates its reply topic just before its first request; the worker, which had
    listed the topics for an earlier caller's reply_to, took the new one for missing for 30 s and
    sent its answers to the responses topic only (the caller, reading its reply topic, timed out)."""
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    with thread_worker(exp, "a"):
        with AbqClient(settings, exp, reply_topic=_reply_topic(exp, "early")) as early:
            assert early.submit(_chat(exp, "first"), timeout=30).response.ok  # the worker lists the topics
        with AbqClient(settings, exp, reply_topic=_reply_topic(exp, "late")) as late:
            reply = late.submit(_chat(exp, "second"), timeout=10)
    assert reply.response.ok and reply.response.reply_error is None


def test_a_streamed_requests_shadow_copy_is_answered_whole(settings, thread_worker):
    """A shadow never answers a caller, so its copy has no reply topic: a copy that kept stream: true
    was refused as a stream without one, and the shadow never saw streamed traffic."""
    exp = new_experiment(variants=(("a", 100), ("s", 0)))
    exp.variants[1].shadow_of, exp.variants[1].shadow_percent = "a", 100
    ensure_topics(settings, exp)
    with (
        thread_worker(exp, "a"),
        thread_worker(exp, "s"),
        AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client,
    ):
        assert text_of(CHAT, list(client.stream(_chat(exp, "seen by both", rid="both"), timeout=30))) == "seen by both"
        wait_until(
            lambda: read_all(settings, exp.shadow_response_topic, expect=1, timeout=5), 30, "the shadow's answer"
        )
    (shadow,) = [decode_response(r.value) for r in read_all(settings, exp.shadow_response_topic)]
    assert shadow.error is None and shadow.body["choices"][0]["message"]["content"] == "seen by both"


def test_a_cancel_sent_while_no_worker_runs_keeps_its_request_from_the_engine(settings, thread_worker):
    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    with AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client, client.expecting({"queued"}):
        client.publish(_chat(exp, "never run", rid="queued"))
        client.cancel("queued")  # no worker yet: the one that starts reads the last hour of cancels
        with thread_worker(exp, "a") as worker:
            reply = client.wait({"queued"}, timeout=30)["queued"]
            assert reply.response.error.code == "cancelled" and reply.response.timings.started is None
            assert _metric(worker, "abq_cancels_total", stage="queued") == 1


def test_the_first_token_is_never_held_back_behind_a_role_only_chunk(stub_broker):
    """vLLM opens a chat stream with a chunk holding the role alone: coalescing the first token after
    it held it back up to the 50 ms interval (on the stub broker: what the worker sends, and when)."""
    from schemas.chunks import chunk, delta
    from schemas.stream import decode_part
    from workers.streams import StreamPublisher

    stub_broker.create_topic("replies")
    publisher = StreamPublisher(stub_broker.producer(), "w", interval_s=10.0)
    try:
        s = publisher.open("replies", b"k", "r1", "tag", "a")
        sent = lambda: len(stub_broker.records("replies"))  # noqa: E731
        s.put(chunk(CHAT, "r1", "m", 0, [delta(CHAT, 0, "", first=True)]))  # the role alone, sent at once
        stub_broker.wait_for(lambda: sent() == 1, what="the role chunk sent")
        s.put(chunk(CHAT, "r1", "m", 0, [delta(CHAT, 0, "Hello")]))  # the first token, a moment later
        stub_broker.wait_for(lambda: sent() == 2, what="the first token sent at once")
        s.put(chunk(CHAT, "r1", "m", 0, [delta(CHAT, 0, " world")]))  # coalesced: waits for the interval
        time.sleep(0.2)
        assert sent() == 2
        s.end()
        parts = [decode_part(r.value) for r in stub_broker.records("replies")]
        assert [len(p.chunks) for p in parts] == [1, 1, 1] and parts[-1].last
    finally:
        publisher.close()


def test_the_cancel_reader_says_it_caught_up_only_once_it_handed_on_every_earlier_cancel(settings):
    """The worker's first batch waits for this (workers/middleware/cancelling.py): set early, a request
    cancelled before the worker started would reach the engine."""
    from workers.cancels import CancelReader

    exp = new_experiment(variants=(("a", 100),))
    ensure_topics(settings, exp)
    with AbqClient(settings, exp, reply_topic=_reply_topic(exp)) as client:
        for i in range(50):
            client.cancel(f"r{i}")
    seen: list[str] = []

    def slowly(cancel) -> None:
        time.sleep(0.01)
        seen.append(cancel.request_id)

    reader = CancelReader(settings, exp.cancel_topic, slowly)
    try:
        assert reader.caught_up.wait(30)
        assert len(seen) == 50
    finally:
        reader.close()
    missing = CancelReader(settings, f"{exp.cancel_topic}.absent", seen.append)
    try:
        assert missing.caught_up.wait(30), "a topic it cannot read leaves nothing to wait for"
    finally:
        missing.close()
