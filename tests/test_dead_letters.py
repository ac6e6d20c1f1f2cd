"""Bad input goes to the dead-letter topic with its original bytes and a reason; the worker keeps serving."""

import orjson
from fuzz_harness import RawHeaderKey
from kafka_helpers import dead_letters

from abqueue.kafka import ensure_topics, producer
from producers import AbqClient
from schemas import ExperimentConfig, InferenceRequest, encode


def test_garbage_wrong_schema_and_oversized_records_are_dead_lettered_and_valid_ones_served(settings, thread_worker):
    exp = ExperimentConfig(
        name=f"dl{__import__('uuid').uuid4().hex[:8]}",
        partitions=1,
        variants=[
            {"name": "a", "weight": 50, "max_prompt_chars": 100, "max_tokens_limit": 64},
            {"name": "b", "weight": 50},
        ],
    )
    ensure_topics(settings, exp)
    topic = exp.request_topic("a")

    def valid(i, max_tokens=16):
        return InferenceRequest(
            experiment=exp.name, routing_key=f"u{i}", variant="a", prompt=f"ok {i}", max_tokens=max_tokens
        )

    bad = {
        b"\x00\x01 definitely not json": "not_json",
        b'"a json string"': "invalid_schema",
        orjson.dumps(
            {"experiment": exp.name, "routing_key": "u", "prompt": "p", "variant": "a", "unknown": 1}
        ): "invalid_schema",
        orjson.dumps(
            {"experiment": exp.name, "routing_key": "u", "prompt": "p", "variant": "a", "top_p": 0}
        ): "invalid_params",
        encode(valid(100, max_tokens=65)): "invalid_params",
        encode(valid(101).model_copy(update={"variant": "b"})): "wrong_variant",
        encode(valid(102).model_copy(update={"experiment": "other"})): "wrong_experiment",
        encode(valid(103).model_copy(update={"prompt": "x" * 101})): "oversized_prompt",
        encode(valid(104).model_copy(update={"variant": None})): "wrong_variant",
    }
    p = producer(settings)
    good_ids = []
    for i, (value, _) in enumerate(bad.items()):
        req = valid(i)
        good_ids.append(req.id)
        p.send(topic, key=b"k", value=encode(req))  # valid requests interleaved with the bad ones
        p.send(topic, key=b"bad", value=value)
    p.flush()
    p.close()

    with AbqClient(settings, exp, accept_untagged=True) as client:
        client.listener._consumer.seek_to_beginning()
        with thread_worker(exp, "a", max_batch=4) as worker:
            got = client.wait(set(good_ids), timeout=30)
            assert worker.batches > 0 and not worker.stopping
    assert set(got) == set(good_ids) and all(r.response.ok for r in got.values())

    letters = dead_letters(settings, exp.deadletter_topic, expect=len(bad))
    assert len(letters) == len(bad)
    by_value = {dl.original_value(): dl for dl in letters}
    assert set(by_value) == set(bad)
    for value, reason in bad.items():
        dl = by_value[value]
        assert dl.reason == reason, (value[:40], dl.detail)
        assert dl.source_topic == topic and dl.source_partition == 0 and dl.source_offset >= 0
        assert dl.detail and "\n" not in dl.detail and dl.original_key_b64 == "YmFk"  # b"bad"
    offsets = sorted(dl.source_offset for dl in letters)
    assert offsets == [2 * i + 1 for i in range(len(bad))]


def test_records_kafka_would_refuse_are_made_to_fit_instead_of_blocking_the_partition(settings, thread_worker):
    """A response or dead letter over its topic's max.message.bytes would be refused on every retry and
    stall the partition; the worker shrinks it and keeps serving."""
    exp = ExperimentConfig(
        name=f"big{__import__('uuid').uuid4().hex[:8]}",
        partitions=1,
        variants=[{"name": "a", "weight": 100, "max_tokens_limit": 100_000, "max_prompt_chars": 200_000}],
    )
    ensure_topics(settings, exp)
    words = "ab " * 45_000  # 135 KB of prompt; 16 echoed samples make a 2 MB response
    huge_response = InferenceRequest(
        experiment=exp.name, routing_key="u1", variant="a", prompt=words, n=16, max_tokens=50_000
    )
    lost_reply_to = InferenceRequest(
        experiment=exp.name,
        routing_key="u2",
        variant="a",
        prompt="still answered",
        reply_to=f"abq.{exp.name}.replies.no-such-topic",
    )
    after = InferenceRequest(experiment=exp.name, routing_key="u3", variant="a", prompt="served after")
    garbage = b"\xff" * 1_000_000  # accepted by the request topic, too big once base64'd into a dead letter
    p = producer(settings, max_request_size=2_000_000)
    for value in (encode(huge_response), garbage, encode(lost_reply_to), encode(after)):
        p.send(exp.request_topic("a"), key=b"k", value=value)
    p.flush()
    p.close()
    with AbqClient(settings, exp, accept_untagged=True) as client:
        client.listener._consumer.seek_to_beginning()
        with thread_worker(exp, "a", max_batch=1):
            got = client.wait({huge_response.id, lost_reply_to.id, after.id}, timeout=60)
    assert len(got) == 3
    too_large = got[huge_response.id].response
    assert too_large.error.code == "too_large" and "lower n or max_tokens" in too_large.error.message
    assert got[lost_reply_to.id].response.outputs == ["still answered"]
    assert got[after.id].response.ok
    [letter] = dead_letters(settings, exp.deadletter_topic, expect=1)
    assert letter.reason == "not_json" and letter.original_value_truncated
    assert 500_000 < len(letter.original_value()) < 1_000_000 and garbage.startswith(letter.original_value())


def test_bad_requests_are_answered_with_the_reason_and_reply_to_reaches_only_allowed_topics(settings, thread_worker):
    """A caller whose request is dead-lettered gets an `invalid_request` answer at once, naming the
    reason, instead of waiting out its timeout; a `reply_to` outside the experiment's reply topics
    (by default abq.<experiment>.replies.*) is refused before anything is written there."""
    from kafka_helpers import end_offsets, responses

    from abqueue.kafka import admin_client

    exp = ExperimentConfig(
        name=f"rt{__import__('uuid').uuid4().hex[:8]}",
        partitions=1,
        variants=[{"name": "a", "weight": 100, "max_tokens_limit": 64}],
    )
    ensure_topics(settings, exp)
    allowed, victim = f"abq.{exp.name}.replies.me", f"{exp.name}.victim"
    admin = admin_client(settings)
    admin.create_topics({t: {"num_partitions": 1, "replication_factor": 1} for t in (allowed, victim)})
    admin.close()

    def req(rid, max_tokens=16, **kw):
        return InferenceRequest(
            id=rid, experiment=exp.name, routing_key=rid, variant="a", prompt=rid, max_tokens=max_tokens, **kw
        )

    records = {
        "too-many-tokens": encode(req("too-many-tokens", max_tokens=65, reply_to=allowed)),
        "into-config": encode(req("into-config", reply_to="abq.experiments")),
        "into-victim": encode(req("into-victim", reply_to=victim)),
        "unknown-field": orjson.dumps(
            {
                "id": "unknown-field",
                "experiment": exp.name,
                "routing_key": "u",
                "variant": "a",
                "prompt": "p",
                "colour": 1,
            }
        ),
        "allowed": encode(req("allowed", reply_to=allowed)),
    }
    config_end = end_offsets(settings, "abq.experiments") if "abq.experiments" in _topics(settings) else None
    p = producer(settings)
    for value in [*records.values(), b"not json, no id"]:
        p.send(exp.request_topic("a"), key=b"k", value=value)
    p.flush()
    p.close()
    with AbqClient(settings, exp, accept_untagged=True) as client:
        client.listener._consumer.seek_to_beginning()
        with thread_worker(exp, "a"):
            got = client.wait(set(records), timeout=30)
    assert set(got) == set(records), f"no answer for {set(records) - set(got)}"
    assert got["allowed"].response.ok
    for rid in set(records) - {"allowed"}:
        err = got[rid].response.error
        assert err is not None and err.code == "invalid_request", (rid, got[rid].response)
    assert "max_tokens 65 exceeds" in got["too-many-tokens"].response.error.message
    assert "colour" in got["unknown-field"].response.error.message
    for rid in ("into-config", "into-victim"):
        message = got[rid].response.error.message
        assert "reply_to_refused" in message and f"abq.{exp.name}.replies.*" in message, message

    # Nothing reached the refused topics; the allowed one got both answers meant for it.
    assert end_offsets(settings, victim) == {0: 0}
    if config_end is not None:
        assert end_offsets(settings, "abq.experiments") == config_end
    to_allowed = {r.request_id: r for r in responses(settings, allowed, expect=2)}
    assert set(to_allowed) == {"allowed", "too-many-tokens"}
    letters = {dl.request_id: dl.reason for dl in dead_letters(settings, exp.deadletter_topic, expect=5)}
    assert letters == {
        "too-many-tokens": "invalid_params",
        "into-config": "reply_to_refused",
        "into-victim": "reply_to_refused",
        "unknown-field": "invalid_schema",
        None: "not_json",
    }


def _topics(settings) -> set[str]:
    from abqueue.kafka import admin_client

    admin = admin_client(settings)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_a_producer_refuses_a_reply_to_the_experiment_does_not_allow(settings):
    from producers.publisher import RequestPublisher
    from schemas import ConfigError

    exp = ExperimentConfig(name=f"rp{__import__('uuid').uuid4().hex[:8]}", variants=[{"name": "a", "weight": 100}])
    publisher = RequestPublisher(settings, exp)
    try:
        with __import__("pytest").raises(ConfigError, match=r"reply_to abq\.rollouts .*reply_topics"):
            publisher.publish(
                InferenceRequest(experiment=exp.name, routing_key="u", prompt="p", reply_to="abq.rollouts")
            )
    finally:
        publisher.close()


def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_the_partition_moves_on(settings, thread_worker):
    """kafka-python decodes header keys strictly inside poll(); one such record used to stop the worker
    and every replacement at the same offset."""
    from kafka_helpers import committed, wait_until

    exp = ExperimentConfig(
        name=f"hk{__import__('uuid').uuid4().hex[:8]}", partitions=1, variants=[{"name": "a", "weight": 100}]
    )
    ensure_topics(settings, exp)

    def req(rid):
        return InferenceRequest(id=rid, experiment=exp.name, routing_key=rid, variant="a", prompt=rid, max_tokens=8)

    p = producer(settings)
    p.send(exp.request_topic("a"), key=b"k", value=encode(req("before")))
    p.send(
        exp.request_topic("a"), key=b"k", value=encode(req("hostile")), headers=[(RawHeaderKey(b"\xff\xfeid"), b"v")]
    )
    p.send(exp.request_topic("a"), key=b"k", value=encode(req("after")))
    p.flush()
    p.close()
    with AbqClient(settings, exp, accept_untagged=True) as client:
        client.listener._consumer.seek_to_beginning()
        with thread_worker(exp, "a") as worker:
            got = client.wait({"before", "hostile", "after"}, timeout=30)
            wait_until(
                lambda: committed(settings, exp.consumer_group("a"), exp.request_topic("a")) == {0: 3},
                15,
                "commit to the end",
            )
            assert not worker.stopping
    assert got["before"].response.ok and got["after"].response.ok
    err = got["hostile"].response.error
    assert err.code == "invalid_request" and "invalid_header" in err.message and r"\xff\xfeid" in err.message
    [letter] = dead_letters(settings, exp.deadletter_topic, expect=1)
    assert letter.reason == "invalid_header" and letter.request_id == "hostile" and letter.source_offset == 1
