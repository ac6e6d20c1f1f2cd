"""Bad input goes to the dead-letter topic with its original bytes and a reason; the worker keeps serving."""

import orjson
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

    with AbqClient(settings, exp) as client:
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
        reply_to=f"{exp.name}.no-such-topic",
    )
    after = InferenceRequest(experiment=exp.name, routing_key="u3", variant="a", prompt="served after")
    garbage = b"\xff" * 1_000_000  # accepted by the request topic, too big once base64'd into a dead letter
    p = producer(settings, max_request_size=2_000_000)
    for value in (encode(huge_response), garbage, encode(lost_reply_to), encode(after)):
        p.send(exp.request_topic("a"), key=b"k", value=value)
    p.flush()
    p.close()
    with AbqClient(settings, exp) as client:
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
